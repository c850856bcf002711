"""KubeRay RayJob objects, without a client: a run's record from the API's RayJob, the
RayJob to create rendered from a template, and the lifecycle checks KubeRay applies.

The Kubernetes target (``ray_jobs.watch_targets.KubernetesTarget``) sends what these build.
"""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from fadrm.watch.decision import (
    ACTIVE,
    DELETING,
    FAILED,
    LABEL_ATTEMPT,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    MANAGER,
    STOPPED,
    SUCCEEDED,
    RunRecord,
    fingerprint_labels,
    label_value,
    rayjob_name,
    stale_summary,
)

__all__ = [
    "ANNOTATION_REASON",
    "DEFAULT_TEMPLATE",
    "LABEL_COMPONENT",
    "LABEL_KUEUE_QUEUE",
    "lifecycle_problems",
    "load_template_file",
    "rayjob_record",
    "render_rayjob",
    "template_from_object",
]

# The template's component label, rewritten for the runs made from it.
LABEL_COMPONENT = "app.kubernetes.io/component"
# Annotation with the human-readable reason a run was started (kubectl describe).
ANNOTATION_REASON = "fadrm.io/reason"
# Kueue's queue label: Kueue suspends such RayJobs at creation and admits them later.
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
DEFAULT_TEMPLATE = "raycronjob/fadrm-run-template"
"""The suspended RayCronJob of k8s/base whose jobTemplate is the RayJob spec of every run."""


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def rayjob_record(item: dict) -> RunRecord:
    """A KubeRay RayJob object (as the API returns it) as a :class:`RunRecord`."""
    meta = item.get("metadata") or {}
    status = item.get("status") or {}
    deployment = status.get("jobDeploymentStatus", "") or ""
    job = status.get("jobStatus", "") or ""
    why = " ".join(str(x) for x in (status.get("reason"), status.get("message")) if x)
    detail = "/".join(x for x in (deployment, job) if x) + (f": {why}" if why else "")
    suspended = False
    if meta.get("deletionTimestamp"):
        state = DELETING
    elif deployment == "Complete":
        state = SUCCEEDED if job == "SUCCEEDED" else STOPPED
    elif deployment in ("Failed", "ValidationFailed"):
        state = FAILED
    else:  # "", New, Initializing, Waiting, Running, Retrying, Suspending, Suspended
        state = ACTIVE
        suspended = deployment in ("Suspending", "Suspended")
    return RunRecord(
        name=meta.get("name", ""), labels=dict(meta.get("labels") or {}), state=state,
        detail=detail or "New", created=_parse_time(meta.get("creationTimestamp")),
        suspended=suspended, uid=meta.get("uid", ""),
    )


# --------------------------------------------------------------------------- templates


# Server-set metadata that must not be sent on create.
_SERVER_METADATA = (
    "name", "generateName", "namespace", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields",
    "selfLink", "ownerReferences", "finalizers",
)
_DROP_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def template_from_object(obj: dict) -> dict:
    """A RayJob template from a RayJob, or from a RayCronJob (its ``jobTemplate``; the
    RayCronJob's labels and annotations become the RayJob's, so a label an overlay puts
    on the template, e.g. Kueue's queue, reaches every run)."""
    api, kind = obj.get("apiVersion"), obj.get("kind")
    if api != "ray.io/v1" or kind not in ("RayJob", "RayCronJob"):
        raise ValueError(f"template must be a ray.io/v1 RayJob or RayCronJob, got {api}/{kind}")
    meta = obj.get("metadata") or {}
    labels = dict(meta.get("labels") or {})
    if kind == "RayCronJob":
        spec = copy.deepcopy((obj.get("spec") or {}).get("jobTemplate") or {})
        if labels.get(LABEL_COMPONENT) == "run-template":
            labels[LABEL_COMPONENT] = "distill"
    else:
        spec = copy.deepcopy(obj.get("spec") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if k not in _DROP_ANNOTATIONS and not k.startswith("fadrm.io/template")}
    out_meta: dict[str, Any] = {}
    if labels:
        out_meta["labels"] = labels
    if annotations:
        out_meta["annotations"] = annotations
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": out_meta, "spec": spec}


def load_template_file(path: str | Path, name: str | None = None) -> dict:
    """The template in a YAML file: a RayJob, a RayCronJob, or `kubectl kustomize` output
    holding one (the RayCronJob ``name``, default ``fadrm-run-template``, when several)."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    ray = [d for d in docs if d.get("apiVersion") == "ray.io/v1"
           and d.get("kind") in ("RayJob", "RayCronJob")]
    wanted = name or DEFAULT_TEMPLATE.split("/", 1)[1]
    if len(ray) > 1:
        ray = [d for d in ray if (d.get("metadata") or {}).get("name") == wanted]
    if len(ray) != 1:
        from fadrm.errors import InputError

        raise InputError(f"{path}: expected one RayJob or RayCronJob template "
                         f"(named {wanted!r} when there are several), found {len(ray)}")
    return template_from_object(ray[0])


def _autoscaling(spec: dict) -> bool:
    return bool((spec.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling"))


def lifecycle_problems(rayjob: dict) -> list[str]:
    """What KubeRay 1.7 would answer with ``ValidationFailed`` about the lifecycle fields
    of ``rayjob`` (utils/validation.go ValidateRayJobSpec), plus Kueue's constraint. Kueue
    suspends a queued RayJob at creation, and KubeRay allows ``suspend`` only with
    ``shutdownAfterJobFinishes: true``, which excludes ``deletionRules``."""
    spec = rayjob.get("spec") or {}
    labels = (rayjob.get("metadata") or {}).get("labels") or {}
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    suspend = bool(spec.get("suspend")) or LABEL_KUEUE_QUEUE in labels
    rules = ((spec.get("deletionStrategy") or {}).get("deletionRules")) or []
    problems = []
    if suspend and not shutdown:
        why = "Kueue suspends it at creation (label %s)" % LABEL_KUEUE_QUEUE \
            if LABEL_KUEUE_QUEUE in labels else "spec.suspend is true"
        problems.append(f"{why}, and KubeRay allows suspend only with "
                        "shutdownAfterJobFinishes: true (use k8s/components/kueue)")
    if not shutdown and int(spec.get("ttlSecondsAfterFinished") or 0) > 0:
        problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    if rules and shutdown:
        problems.append("shutdownAfterJobFinishes and deletionStrategy.deletionRules are "
                        "mutually exclusive")
    seen: dict[tuple, dict[str, int]] = {}
    order = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")
    for i, rule in enumerate(rules):
        cond, policy = rule.get("condition") or {}, rule.get("policy")
        if ("jobStatus" in cond) == ("jobDeploymentStatus" in cond):
            problems.append(f"deletionRules[{i}]: exactly one of jobStatus and "
                            "jobDeploymentStatus must be set")
            continue
        if policy == "DeleteWorkers" and _autoscaling(spec):
            problems.append(f"deletionRules[{i}]: DeleteWorkers is not supported with "
                            "autoscaling")
        key = ("jobStatus", cond["jobStatus"]) if "jobStatus" in cond else (
            "jobDeploymentStatus", cond["jobDeploymentStatus"])
        ttls = seen.setdefault(key, {})
        if policy in ttls:
            problems.append(f"deletionRules[{i}]: duplicate rule for {policy} and {key[1]}")
        ttls[policy] = int(cond.get("ttlSeconds") or 0)
    for key, ttls in seen.items():
        present = [(p, ttls[p]) for p in order if p in ttls]
        for (p1, t1), (p2, t2) in zip(present, present[1:]):
            if t2 < t1:
                problems.append(f"for {key[0]} {key[1]!r}: {p2} TTL ({t2}) must be >= "
                                f"{p1} TTL ({t1})")
    return problems


def render_rayjob(template: dict, status: Any, config_name: str, *, name: str | None = None,
                  attempt: int = 1) -> dict:
    """The RayJob to create for ``status``: a deep copy of ``template`` (a RayJob, or a
    RayCronJob whose jobTemplate is used) named :func:`rayjob_name`, with labels carrying
    the run name, the fingerprints, the attempt and ``managed-by: fadrm-watch``."""
    if template.get("kind") == "RayCronJob":
        template = template_from_object(template)
    if template.get("apiVersion") != "ray.io/v1" or template.get("kind") != "RayJob":
        raise ValueError(
            f"template must be a ray.io/v1 RayJob, got "
            f"{template.get('apiVersion')}/{template.get('kind')}"
        )
    obj = copy.deepcopy(template)
    obj.pop("status", None)
    meta = obj.setdefault("metadata", {})
    for key in _SERVER_METADATA:
        meta.pop(key, None)
    fps = fingerprint_labels(status)
    meta["name"] = name or rayjob_name(config_name, fps, attempt)
    meta["labels"] = {
        **(meta.get("labels") or {}),
        LABEL_RUN: label_value(config_name),
        **fps,
        LABEL_ATTEMPT: str(attempt),
        LABEL_MANAGED_BY: MANAGER,
    }
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if k not in _DROP_ANNOTATIONS}
    summary = stale_summary(status)
    if summary:
        annotations[ANNOTATION_REASON] = summary[:1000]
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    return obj
