"""Scheduled re-distillation: start a run only when something is stale, safely unattended.

``fadrm watch`` asks the lineage which stages of a run are stale (a teacher checkpoint, the
data or the config changed, or a stage never finished), looks at the runs of this run name
on a *target*, and acts on what it finds:

* ``skip-up-to-date``      -- every stage is done: nothing to do (no cluster call at all);
* ``skip-already-running`` -- a run with the same fingerprints is active (running, queued,
                              retrying or suspended), or an active run carries no
                              fingerprints (applied by hand): never a second one beside it;
* ``backoff``              -- ``max_failures`` runs for the same fingerprints already ended
                              without making the run up to date: create nothing more for
                              them, record why (a Kubernetes Warning Event on the last failed
                              RayJob) and exit 3 (:data:`EXIT_BACKOFF`) so the CronJob shows
                              the failure. New fingerprints (a new teacher, config or data)
                              lift it, and so does deleting those failed runs (the Event and
                              the log print the exact ``kubectl delete``);
* ``submit``               -- otherwise: create run number ``attempt`` for the fingerprints.

Whatever it decides, runs the watch created for *other* fingerprints are obsolete and are
deleted: a running one is stopped (deleting a RayJob makes KubeRay stop the Ray job and
delete its cluster), a finished or failed one is tidied away (it is no longer a back-off
record). Runs created by hand (without the ``app.kubernetes.io/managed-by: fadrm-watch``
label) are never touched.

Creation is idempotent: a run's name is derived from its fingerprints and attempt number
(``fadrm-<run>-<hash>-<attempt>``, :func:`rayjob_name`), so two watches racing (a manual
``kubectl create job --from=cronjob/fadrm-watch`` beside the schedule) create at most one
run; the loser gets ``AlreadyExists``, which is success when the existing run carries the
same fingerprints.

How KubeRay states count (:func:`rayjob_record`): ``Complete`` with job status
``SUCCEEDED`` succeeded; ``Complete`` with ``STOPPED`` (``ray job stop``) was cancelled: the
watch deletes it, because KubeRay's ``deletionRules`` only match SUCCEEDED/FAILED and its
cluster would otherwise stay up, and it does not count as a failure; ``Failed`` (after
KubeRay's own ``backoffLimit`` retries) and ``ValidationFailed`` (the spec was refused, it
never ran) are failures; ``Suspended`` (queued by Kueue, or paused by a person) is *active*:
the watch never starts a duplicate beside it, warns when it has been suspended longer than a
day, and deletes it like any other run once its fingerprints are obsolete. A run that
finished successfully while the stages are still stale also counts as a failed attempt, so
a run that "succeeds" without producing its outputs cannot loop forever either.

Two targets share one small interface (``runs`` / ``submit`` / ``stop`` /
``record_backoff``):

* :class:`KubernetesTarget` creates KubeRay ``RayJob``s from a template: the
  ``RayCronJob`` ``fadrm-run-template`` of k8s/base (kept ``suspend: true``, so KubeRay never
  schedules it), read from the API so that every kustomize overlay (``images:``,
  ``namespace:``, patches) reaches the runs; or a YAML file (dry runs from a workstation).
* :class:`RayJobsTarget` submits to a Ray Jobs API address with ``JobSubmissionClient`` (for
  ``ray job submit`` users); the fingerprints travel as job metadata, the deterministic name
  is the submission id, and the run config is shipped in the job's ``working_dir``.

The decision (:func:`decide`) and the RayJob rendering (:func:`render_rayjob`) are pure
functions; only the targets talk to a cluster. Nothing here logs credentials: S3 keys, the
Ray auth token and the Kubernetes token are read by the libraries, never printed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import yaml

from fadrm.errors import EXIT_RUN_FAILED

__all__ = [
    "LABEL_CONFIG",
    "LABEL_TEACHERS",
    "LABEL_DATA",
    "LABEL_RUN",
    "LABEL_ATTEMPT",
    "LABEL_MANAGED_BY",
    "MANAGER",
    "DEFAULT_MAX_FAILURES",
    "DEFAULT_TEMPLATE",
    "EXIT_BACKOFF",
    "RunRecord",
    "Decision",
    "decide",
    "fingerprint_labels",
    "label_value",
    "rayjob_name",
    "rayjob_name_prefix",
    "rayjob_record",
    "render_rayjob",
    "template_from_object",
    "load_template_file",
    "lifecycle_problems",
    "KubernetesTarget",
    "RayJobsTarget",
    "watch",
    "add_watch_arguments",
    "run_watch",
]

log = logging.getLogger("fadrm.watch")

# Labels (RayJobs) / metadata keys (Ray jobs) that identify what a run was started for.
LABEL_CONFIG = "fadrm.io/config"
LABEL_TEACHERS = "fadrm.io/teachers"
LABEL_DATA = "fadrm.io/data"
LABEL_RUN = "fadrm.io/run"
LABEL_ATTEMPT = "fadrm.io/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
MANAGER = "fadrm-watch"
# Annotation with the human-readable reason a run was started (kubectl describe).
ANNOTATION_REASON = "fadrm.io/reason"
# Kueue's queue label: Kueue suspends such RayJobs at creation and admits them later.
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

SUBMIT = "submit"
SKIP_UP_TO_DATE = "skip-up-to-date"
SKIP_RUNNING = "skip-already-running"
BACKOFF = "backoff"

DEFAULT_MAX_FAILURES = 2
"""Failed runs for one set of fingerprints after which the watch stops creating runs."""
DEFAULT_TEMPLATE = "raycronjob/fadrm-run-template"
"""The suspended RayCronJob of k8s/base whose jobTemplate is the RayJob spec of every run."""
EXIT_BACKOFF = EXIT_RUN_FAILED
"""`fadrm watch` exit status in back-off: 3, fadrm.errors.EXIT_RUN_FAILED (runs failed)."""
SUSPENDED_WARN_S = 24 * 3600
"""A run suspended longer than this is reported (log + decision.warnings) on every tick."""

# Run states as the watch sees them (RunRecord.state).
ACTIVE, SUCCEEDED, FAILED, STOPPED, DELETING = (
    "active", "succeeded", "failed", "stopped", "deleting")

# KubeRay: a RayJob name is a DNS-1035 label of at most 47 characters (the RayCluster it
# creates appends 6 more).
_MAX_RAYJOB_NAME = 47
_HASH_CHARS = 8
_ATTEMPT_ROOM = 3  # attempts up to 999 fit
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_IDENTITY = (LABEL_CONFIG, LABEL_TEACHERS)  # always compared; LABEL_DATA when both have it


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunRecord:
    """One run of this run name on a target, reduced to what the decision needs."""

    name: str
    labels: dict[str, str]
    state: str
    """'active', 'succeeded', 'failed', 'stopped' (cancelled) or 'deleting'."""
    detail: str = ""
    """KubeRay/Ray status, reason and message, for logs and the back-off Event."""
    created: float | None = None
    """Creation time (epoch seconds) when known."""
    suspended: bool = False
    """Active but suspended (Kueue queue, or paused by a person)."""
    uid: str = ""

    @property
    def managed(self) -> bool:
        return self.labels.get(LABEL_MANAGED_BY) == MANAGER

    @property
    def has_fingerprints(self) -> bool:
        return LABEL_CONFIG in self.labels or LABEL_TEACHERS in self.labels

    @property
    def attempt(self) -> int:
        value = self.labels.get(LABEL_ATTEMPT, "")
        return int(value) if value.isdigit() else 0

    def matches(self, labels: dict[str, str]) -> bool:
        """Same config and teacher fingerprints (and data, where both record one)."""
        if any(self.labels.get(k) != labels.get(k) for k in _IDENTITY):
            return False
        mine, theirs = self.labels.get(LABEL_DATA), labels.get(LABEL_DATA)
        return mine is None or theirs is None or mine == theirs


def _as_record(run: RunRecord | dict) -> RunRecord:
    # A plain label dict (as older callers pass) is an active run of unknown name.
    return run if isinstance(run, RunRecord) else RunRecord("", dict(run), ACTIVE)


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


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class Decision:
    """What the watch decided, why, and (after acting) what it did."""

    action: str
    """'submit', 'skip-up-to-date', 'skip-already-running' or 'backoff'."""
    reason: str
    labels: dict[str, str] = field(default_factory=dict)
    """The fingerprint labels a submitted run carries (LABEL_CONFIG, LABEL_TEACHERS, ...)."""
    name: str = ""
    """The deterministic name of the run to create (submit) / that would come next."""
    attempt: int = 1
    stop: tuple[RunRecord, ...] = ()
    """Watch-made runs to delete: other fingerprints (obsolete) or cancelled (stopped)."""
    failures: tuple[RunRecord, ...] = ()
    """The failed runs for the current fingerprints (the back-off count)."""
    warnings: tuple[str, ...] = ()
    submitted: str | None = None
    """Name of the created RayJob / id of the submitted Ray job; None when nothing was."""
    stopped: tuple[str, ...] = ()
    """Names of the runs actually deleted/stopped."""
    preview: dict | None = None
    """With ``dry_run``: the object a Kubernetes target would have created."""

    @property
    def should_submit(self) -> bool:
        return self.action == SUBMIT

    @property
    def exit_code(self) -> int:
        return EXIT_BACKOFF if self.action == BACKOFF else 0


def label_value(text: str) -> str:
    """``text`` as a valid Kubernetes label value (<= 63 chars of [A-Za-z0-9-_.])."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.")


def fingerprint_labels(status: Any) -> dict[str, str]:
    """The config and teacher (and, when known, data) fingerprints of ``status`` as labels."""
    fps = getattr(status, "fingerprints", None) or {}
    labels = {}
    for label, key in ((LABEL_CONFIG, "config"), (LABEL_TEACHERS, "teachers"),
                       (LABEL_DATA, "data")):
        value = fps.get(key)
        if key == "data" and not value:
            continue  # optional
        if not isinstance(value, str) or not value:
            raise ValueError(f"run status has no {key!r} fingerprint (got {sorted(fps)})")
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise ValueError(f"{key} fingerprint {value!r} is not a valid label value")
        labels[label] = value
    return labels


def _stale_summary(status: Any) -> str:
    """'recover: stale (teachers[0] changed); relabel: missing' for the stages not done."""
    parts = []
    for stage in getattr(status, "stages", []):
        if stage.state != "done":
            why = f" ({stage.reason})" if getattr(stage, "reason", "") else ""
            parts.append(f"{stage.name}: {stage.state}{why}")
    return "; ".join(parts)


def _slug(config_name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", config_name.lower()).strip("-") or "run"


def rayjob_name_prefix(config_name: str) -> str:
    """``fadrm-<name>-``: the start of every run name of ``config_name`` (DNS-1035)."""
    room = _MAX_RAYJOB_NAME - len("fadrm--") - _HASH_CHARS - 1 - _ATTEMPT_ROOM
    return f"fadrm-{_slug(config_name)[:room].rstrip('-')}-"


def rayjob_name(config_name: str, labels: dict[str, str], attempt: int) -> str:
    """The deterministic run name: ``fadrm-<name>-<fingerprint hash>-<attempt>``.

    Equal fingerprints and attempt give the same name on every machine, so concurrent
    watches collide on ``AlreadyExists`` instead of creating two runs. At most 47
    characters (KubeRay's limit for RayJob names), a DNS-1035 label.
    """
    if not 1 <= attempt < 10 ** _ATTEMPT_ROOM:
        raise ValueError(f"attempt {attempt} out of range")
    identity = json.dumps({k: labels.get(k) for k in (*_IDENTITY, LABEL_DATA)},
                          sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:_HASH_CHARS]
    return f"{rayjob_name_prefix(config_name)}{digest}-{attempt}"


def decide(
    status: Any,
    runs: Iterable[RunRecord | dict],
    *,
    config_name: str = "run",
    max_failures: int = DEFAULT_MAX_FAILURES,
    now: float | None = None,
) -> Decision:
    """What to do, given the run's staleness and the runs of this run name on the target.

    ``status`` is a ``fadrm.lineage.RunStatus`` (or anything with ``up_to_date``,
    ``stages`` and ``fingerprints``); ``runs`` are :class:`RunRecord` (a plain label dict
    is taken as an active run). ``max_failures``: 0 never backs off.
    """
    labels = fingerprint_labels(status)
    records = [_as_record(r) for r in runs]
    live = [r for r in records if r.state != DELETING]
    current = [r for r in live if r.has_fingerprints and r.matches(labels)]
    obsolete = [r for r in live if r.managed and r.has_fingerprints and not r.matches(labels)]
    cancelled = [r for r in current if r.managed and r.state == STOPPED]
    # Next attempt: past every run of these fingerprints, even one being deleted (its name
    # is still taken until it is gone).
    attempt = 1 + max((r.attempt for r in records if r.has_fingerprints
                       and r.matches(labels)), default=0)
    common = dict(labels=labels, name=rayjob_name(config_name, labels, attempt),
                  attempt=attempt, stop=tuple(obsolete + cancelled))
    notes = []
    if obsolete:
        notes.append(f"{len(obsolete)} obsolete run(s) of other fingerprints to delete")
    if cancelled:
        notes.append(f"{len(cancelled)} stopped run(s) to clean up")
    tail = "".join(f"; {n}" for n in notes)

    if status.up_to_date:
        return Decision(SKIP_UP_TO_DATE, "every stage is done for the current inputs" + tail,
                        **common)
    unlabelled = [r for r in live if r.state == ACTIVE and not r.has_fingerprints]
    if unlabelled:
        return Decision(
            SKIP_RUNNING,
            f"an active run of this name carries no fingerprints ({unlabelled[0].name or '?'}"
            ", started by hand?); not starting a second one beside it" + tail, **common)
    active = [r for r in current if r.state == ACTIVE]
    if active:
        warnings = []
        now = time.time() if now is None else now
        for r in active:
            if r.suspended and r.created is not None and now - r.created > SUSPENDED_WARN_S:
                warnings.append(
                    f"run {r.name} has been suspended for {(now - r.created) / 3600:.0f} h "
                    "(Kueue has not admitted it, or it was paused): it still counts as "
                    "active; unsuspend it or delete it to let the watch start a new one")
        return Decision(
            SKIP_RUNNING,
            f"run {active[0].name or '?'} with the same fingerprints is active "
            f"({active[0].detail or 'running'}; config {labels[LABEL_CONFIG]}, teachers "
            f"{labels[LABEL_TEACHERS]})" + tail, warnings=tuple(warnings), **common)
    failures = tuple(r for r in current if r.state in (FAILED, SUCCEEDED))
    if max_failures and len(failures) >= max_failures:
        listing = "; ".join(
            f"{r.name}: {'finished, but stages are still stale' if r.state == SUCCEEDED else r.detail}"
            for r in failures)
        return Decision(
            BACKOFF,
            f"{len(failures)} run(s) for config {labels[LABEL_CONFIG]} and teachers "
            f"{labels[LABEL_TEACHERS]} ended without making the run up to date ({listing}); "
            f"creating no more for these fingerprints (back-off after {max_failures})" + tail,
            failures=failures, **common)
    others = [r for r in live if r.state == ACTIVE and r.has_fingerprints
              and not r.matches(labels) and not r.managed]
    more = f"; {len(others)} active run(s) have other fingerprints" if others else ""
    before = f"; attempt {attempt} after {len(failures)} failed" if failures else ""
    return Decision(SUBMIT, (_stale_summary(status) or "stages not done") + before + more
                    + tail, failures=failures, **common)


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
    summary = _stale_summary(status)
    if summary:
        annotations[ANNOTATION_REASON] = summary[:1000]
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    return obj


# --------------------------------------------------------------------------- targets


class Target(Protocol):
    """Where runs are submitted; both targets below implement this."""

    def runs(self, run_name: str) -> list[RunRecord]: ...

    def submit(self, status: Any, config_name: str, config_path: str | Path, *,
               name: str, attempt: int) -> str: ...

    def stop(self, run: RunRecord) -> bool: ...

    def record_backoff(self, config_name: str, decision: Decision) -> None: ...

    def reset_hint(self, config_name: str, decision: Decision) -> str: ...


_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _api_error(exc: BaseException) -> tuple[int | None, str]:
    """(HTTP status, Kubernetes Status reason) of a kubernetes ``ApiException``."""
    code = getattr(exc, "status", None)
    reason = ""
    body = getattr(exc, "body", None)
    if body:
        try:
            reason = json.loads(body).get("reason", "")
        except (ValueError, AttributeError, TypeError):
            reason = ""
    return (code if isinstance(code, int) else None), reason or str(getattr(exc, "reason", ""))


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubernetesTarget:
    """Create KubeRay RayJobs through the Kubernetes API (``ray.io/v1``, ``rayjobs``).

    Needs exactly (k8s/base/rbac.watch.yaml): get/list/create/delete on ``rayjobs``, get
    on the template RayCronJob, create on ``events``, all in ``namespace``. ``api`` is a
    ``kubernetes.client.CustomObjectsApi`` and ``core_api`` a ``CoreV1Api``; by default
    both are built from the in-cluster service account, or from ~/.kube/config.

    ``template``: a RayJob dict (or RayCronJob), or None to read the RayCronJob named
    ``template_name`` from the API when first needed (the deployed, kustomized template).
    """

    kind = "kubernetes"

    group, version, plural = "ray.io", "v1", "rayjobs"

    def __init__(self, template: dict | None = None, namespace: str | None = None,
                 api: Any = None, core_api: Any = None,
                 template_name: str = DEFAULT_TEMPLATE.split("/", 1)[1]):
        self._template = template_from_object(template) if template else None
        self.template_name = template_name
        # A dry run without a cluster renders from this file instead of the API's template.
        self.offline_template: str | None = None
        self.namespace = namespace or _default_namespace()
        self._api = api
        self._core = core_api

    @classmethod
    def from_file(cls, template_path: str | Path, **kwargs: Any) -> KubernetesTarget:
        return cls(load_template_file(template_path), **kwargs)

    @classmethod
    def from_reference(cls, reference: str, **kwargs: Any) -> KubernetesTarget:
        """``raycronjob/NAME`` (read from the API) or a path to a YAML file."""
        kind, sep, name = reference.partition("/")
        if sep and kind.lower() in ("raycronjob", "raycronjobs") and name and "/" not in name:
            return cls(None, template_name=name, **kwargs)
        return cls.from_file(reference, **kwargs)

    def _client_module(self) -> Any:
        try:
            from kubernetes import client, config
        except ImportError as exc:
            from fadrm.errors import MissingDependencyError

            raise MissingDependencyError(
                "kubernetes", "`fadrm watch --target kubernetes`",
                "pip install 'fadrm[k8s]' or pip install 'kubernetes<37'") from exc
        return client, config

    @property
    def api(self) -> Any:
        if self._api is None:
            client, config = self._client_module()
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.CustomObjectsApi()
        return self._api

    @property
    def core(self) -> Any:
        if self._core is None:
            client, _ = self._client_module()
            self._core = client.CoreV1Api(getattr(self.api, "api_client", None))
        return self._core

    @property
    def template(self) -> dict:
        if self._template is None:
            try:
                obj = self.api.get_namespaced_custom_object(
                    self.group, self.version, self.namespace, "raycronjobs",
                    self.template_name)
            except Exception as exc:
                if self.offline_template is not None and _api_error(exc)[0] != 404:
                    log.warning("dry run: the cluster is not reachable; rendering from %s",
                                self.offline_template)
                    self._template = load_template_file(self.offline_template)
                    return self._template
                if _api_error(exc)[0] != 404:
                    raise
                from fadrm.errors import InputError

                raise InputError(
                    f"the run template, RayCronJob {self.template_name!r}, is not in namespace "
                    f"{self.namespace!r} (apply an overlay of k8s/, e.g. `kubectl apply -k "
                    f"k8s/overlays/gpu`; the RayCronJob CRD comes with KubeRay's Helm chart)"
                ) from None
            self._template = template_from_object(obj)
        return self._template

    def runs(self, run_name: str) -> list[RunRecord]:
        """Every RayJob of ``run_name`` (label fadrm.io/run), any state."""
        listing = self.api.list_namespaced_custom_object(
            self.group, self.version, self.namespace, self.plural,
            label_selector=f"{LABEL_RUN}={label_value(run_name)}",
        )
        return [rayjob_record(item) for item in listing.get("items", [])]

    def active_fingerprints(self, run_name: str) -> list[dict[str, str]]:
        """Labels of the RayJobs of ``run_name`` that are active (queued/running/suspended)."""
        return [r.labels for r in self.runs(run_name) if r.state == ACTIVE]

    def build(self, status: Any, config_name: str, *, name: str | None = None,
              attempt: int = 1) -> dict:
        """The exact object :meth:`submit` creates; refuses a spec KubeRay would fail."""
        body = render_rayjob(self.template, status, config_name, name=name, attempt=attempt)
        problems = lifecycle_problems(body)
        if problems:
            from fadrm.errors import InputError

            raise InputError("RayJob template: KubeRay would refuse it (ValidationFailed): "
                             + "; ".join(problems))
        return body

    def submit(self, status: Any, config_name: str, config_path: str | Path = "", *,
               name: str | None = None, attempt: int = 1) -> str:
        # The RayJob reads its config from the ConfigMap its template mounts (the same
        # ConfigMap the watch reads), so config_path is not needed here.
        body = self.build(status, config_name, name=name, attempt=attempt)
        name = body["metadata"]["name"]
        try:
            created = self.api.create_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, body)
        except Exception as exc:
            code, reason = _api_error(exc)
            if code != 409:
                raise
            # AlreadyExists: a concurrent watch created it first. Fine if it is the same run.
            existing = self.api.get_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, name)
            record = rayjob_record(existing)
            if record.state == DELETING or not record.matches(body["metadata"]["labels"]):
                raise RuntimeError(
                    f"RayJob {name} already exists ({reason or 'AlreadyExists'}) but "
                    f"{'is being deleted' if record.state == DELETING else 'has other fingerprints'}"
                    "; the next tick retries") from exc
            log.info("RayJob %s already exists with the same fingerprints (created by a "
                     "concurrent watch): nothing to do", name)
            return name
        return (created.get("metadata") or {}).get("name", name)

    def stop(self, run: RunRecord) -> bool:
        """Delete the RayJob: KubeRay stops its Ray job (finalizer) and deletes its cluster
        (owner references). False when it was already gone."""
        try:
            self.api.delete_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, run.name,
                propagation_policy="Background")
        except Exception as exc:
            if _api_error(exc)[0] == 404:
                return False
            raise
        return True

    def reset_hint(self, config_name: str, decision: Decision) -> str:
        selector = ",".join(f"{k}={v}" for k, v in (
            (LABEL_RUN, label_value(config_name)), *sorted(decision.labels.items())))
        return f"kubectl -n {self.namespace} delete rayjobs -l {selector}"

    def record_backoff(self, config_name: str, decision: Decision) -> None:
        """A Warning Event on the newest failed RayJob (``kubectl describe rayjob``,
        ``kubectl get events``); best effort: a refused Event is only logged."""
        last = max(decision.failures, key=lambda r: (r.created or 0, r.attempt))
        now = _now_rfc3339()
        message = (f"fadrm watch: {decision.reason}. Reset: "
                   f"{self.reset_hint(config_name, decision)}")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{last.name}.{time.time_ns():x}",
                         "namespace": self.namespace,
                         "labels": {LABEL_RUN: label_value(config_name),
                                    LABEL_MANAGED_BY: MANAGER}},
            "involvedObject": {"apiVersion": f"{self.group}/{self.version}", "kind": "RayJob",
                               "name": last.name, "namespace": self.namespace,
                               **({"uid": last.uid} if last.uid else {})},
            "reason": "RedistillationBackOff",
            "message": message[:1024],
            "type": "Warning",
            "source": {"component": MANAGER},
            "reportingComponent": MANAGER,
            "reportingInstance": os.environ.get("HOSTNAME", MANAGER)[:128],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self.core.create_namespaced_event(self.namespace, event)
        except Exception as exc:  # the exit status still shows the back-off
            log.warning("could not record the back-off Event: %s", exc)


def _default_namespace() -> str:
    # The pod's own namespace: downward API (POD_NAMESPACE), else the service account's.
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if _SA_NAMESPACE.exists():
        return _SA_NAMESPACE.read_text().strip()
    return "default"


# Ray job states (ray.job_submission.JobStatus) as run states.
_RAY_STATES = {"PENDING": ACTIVE, "RUNNING": ACTIVE, "SUCCEEDED": SUCCEEDED,
               "FAILED": FAILED, "STOPPED": STOPPED}


class RayJobsTarget:
    """Submit runs to a Ray cluster's Jobs API (``ray job submit`` users).

    Token auth stays on: the token is taken from ``token``, else ``RAY_AUTH_TOKEN`` or the
    file named by ``RAY_AUTH_TOKEN_PATH``, and sent as a bearer header; without any of them
    Ray's own lookup applies (``RAY_AUTH_MODE=token`` + ``~/.ray/auth_token``). The run
    config is shipped with the job (``working_dir``), so the job runs exactly the config
    the watch evaluated; ``entrypoint`` overrides the default
    ``python -m ray_jobs.distill --config run.yaml``. The submission id is the
    deterministic run name, so a second submission of the same run is refused by Ray.
    """

    kind = "ray"

    def __init__(
        self,
        address: str,
        *,
        entrypoint: str | None = None,
        runtime_env: dict | None = None,
        token: str | None = None,
        client: Any = None,
    ):
        self.address = address
        self.entrypoint = entrypoint
        self.runtime_env = runtime_env or {}
        self._token = token
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from ray.job_submission import JobSubmissionClient
            except ImportError as exc:
                from fadrm.errors import MissingDependencyError

                raise MissingDependencyError(
                    "ray", "`fadrm watch --target ray`", "pip install 'ray[default]'") from exc

            self._client = JobSubmissionClient(self.address, headers=self._auth_headers())
        return self._client

    def _auth_headers(self) -> dict[str, str]:
        token = self._token or os.environ.get("RAY_AUTH_TOKEN")
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        if not token and path:
            token = Path(path).read_text().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}

    @staticmethod
    def _record(job: Any) -> RunRecord:
        state = getattr(job.status, "value", job.status)
        return RunRecord(
            name=job.submission_id or "", labels=dict(job.metadata or {}),
            state=_RAY_STATES.get(str(state), ACTIVE),
            detail=f"{state}" + (f": {job.message}" if getattr(job, "message", None) else ""),
            created=(job.start_time / 1000) if getattr(job, "start_time", None) else None,
        )

    def runs(self, run_name: str) -> list[RunRecord]:
        """Every job of ``run_name`` (metadata fadrm.io/run) the cluster remembers."""
        return [self._record(j) for j in self.client.list_jobs()
                if (j.metadata or {}).get(LABEL_RUN) == label_value(run_name)]

    def active_fingerprints(self, run_name: str) -> list[dict[str, str]]:
        return [r.labels for r in self.runs(run_name) if r.state == ACTIVE]

    def build(self, status: Any, config_name: str, *, name: str | None = None,
              attempt: int = 1) -> dict:
        """What :meth:`submit` sends to the Jobs API (the config travels as run.yaml in a
        fresh working_dir)."""
        fps = fingerprint_labels(status)
        return {
            "address": self.address,
            "submission_id": name or rayjob_name(config_name, fps, attempt),
            "entrypoint": self.entrypoint or "python -m ray_jobs.distill --config run.yaml",
            "metadata": {LABEL_RUN: label_value(config_name), **fps,
                         LABEL_ATTEMPT: str(attempt), LABEL_MANAGED_BY: MANAGER},
            "runtime_env": {**self.runtime_env, "working_dir": "<a folder with run.yaml>"},
        }

    def submit(self, status: Any, config_name: str, config_path: str | Path, *,
               name: str | None = None, attempt: int = 1) -> str:
        fps = fingerprint_labels(status)
        metadata = {
            LABEL_RUN: label_value(config_name),
            **fps,
            LABEL_ATTEMPT: str(attempt),
            LABEL_MANAGED_BY: MANAGER,
        }
        submission_id = name or rayjob_name(config_name, fps, attempt)
        entrypoint = self.entrypoint or "python -m ray_jobs.distill --config run.yaml"
        # Ship the config as working_dir/run.yaml (a fresh folder: nothing else uploaded).
        staging = Path(tempfile.mkdtemp(prefix="fadrm-watch-"))
        try:
            shutil.copyfile(config_path, staging / "run.yaml")
            runtime_env = {**self.runtime_env, "working_dir": str(staging)}
            try:
                return self.client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    metadata=metadata,
                    runtime_env=runtime_env,
                )
            except RuntimeError as exc:
                if "already exists" not in str(exc):
                    raise
                existing = self._record(self.client.get_job_info(submission_id))
                if not existing.matches(metadata):
                    raise
                log.info("Ray job %s already exists with the same fingerprints", submission_id)
                return submission_id
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def stop(self, run: RunRecord) -> bool:
        """Stop an active job; delete a finished one's record (Ray keeps it otherwise)."""
        if run.state == ACTIVE:
            return bool(self.client.stop_job(run.name))
        return bool(self.client.delete_job(run.name))

    def reset_hint(self, config_name: str, decision: Decision) -> str:
        names = " ".join(r.name for r in decision.failures)
        return f"ray job delete --address {self.address} <id> for each of: {names}"

    def record_backoff(self, config_name: str, decision: Decision) -> None:
        # Ray has no event API; the log line and the exit status carry it.
        return None


# --------------------------------------------------------------------------- watch


def _lineage_run_status(cfg: Any) -> Any:
    # Imported late: it pulls in storage backends. Preflight first, so a bad input is an
    # error here, in seconds, instead of a submitted run that fails on the cluster.
    import inspect

    from fadrm.preflight import preflight

    kwargs: dict[str, Any] = {"write_probe": False}
    # Teacher weights are fingerprinted from object-store metadata (fadrm.fingerprints);
    # where preflight can skip reading their bytes, the hourly watch downloads nothing.
    if "read_weights" in inspect.signature(preflight).parameters:
        kwargs["read_weights"] = False
    return preflight(cfg, **kwargs).plan.status()


def _offline_status(cfg: Any, exc: Exception) -> Any:
    """A dry run's status when the config's storage does not answer (a workstation
    offline): nothing known to be done, the config's own fingerprint, teachers unknown."""
    from fadrm.lineage import RunStatus, StageStatus
    from fadrm.pipeline import config_fingerprint

    log.warning("dry run: the storage is not reachable (%s); assuming no stage is done "
                "(teacher fingerprint unknown)", exc)
    stage = StageStatus("stages", "?", "unknown", 0, 0, "storage not reachable (dry run)")
    return RunStatus([stage], {"config": config_fingerprint(cfg), "teachers": "unknown"})


def watch(
    cfg_path: str | Path,
    target: Target,
    status_fn: Callable[[Any], Any] | None = None,
    *,
    dry_run: bool = False,
    max_failures: int = DEFAULT_MAX_FAILURES,
) -> Decision:
    """Check staleness of the run in ``cfg_path`` and act on ``target`` (see the module
    docstring): delete obsolete runs, then submit, skip or back off."""
    from fadrm.config import load_config
    from fadrm.preflight import StorageUnreachable, check_submittable

    cfg = load_config(cfg_path)
    check_submittable(cfg, f"`fadrm watch --target {getattr(target, 'kind', 'cluster')}`")
    try:
        status = (status_fn or _lineage_run_status)(cfg)
    except StorageUnreachable as exc:
        if not dry_run:
            raise
        status = _offline_status(cfg, exc)  # a dry run works offline (k8s/README.md)
    for stage in status.stages:
        log.info("stage %-9s %-8s %s", stage.name, stage.state, getattr(stage, "reason", ""))
    # Nothing stale: no need to ask the cluster anything (a scheduler's common case).
    runs = [] if status.up_to_date else _runs(target, cfg.name, dry_run)
    decision = decide(status, runs, config_name=cfg.name, max_failures=max_failures)
    log.info(
        "run %s: %s (%s) [config %s, teachers %s]",
        cfg.name, decision.action, decision.reason,
        decision.labels[LABEL_CONFIG], decision.labels[LABEL_TEACHERS],
    )
    for warning in decision.warnings:
        log.warning("%s", warning)
    if dry_run:
        for run in decision.stop:
            log.info("dry run: would delete %s (%s)", run.name, run.detail)
        build = getattr(target, "build", None)
        if decision.should_submit and build is not None:
            decision = dataclasses.replace(
                decision, preview=build(status, cfg.name, name=decision.name,
                                        attempt=decision.attempt))
        return decision
    stopped = []
    for run in decision.stop:
        what = "stopping obsolete" if run.state == ACTIVE else "deleting"
        log.info("%s run %s (%s; fingerprints %s/%s)", what, run.name, run.detail,
                 run.labels.get(LABEL_CONFIG), run.labels.get(LABEL_TEACHERS))
        if target.stop(run):
            stopped.append(run.name)
    decision = dataclasses.replace(decision, stopped=tuple(stopped))
    if decision.action == BACKOFF:
        log.error("back-off: %s; reset: %s", decision.reason,
                  target.reset_hint(cfg.name, decision))
        target.record_backoff(cfg.name, decision)
    elif decision.should_submit:
        submitted = target.submit(status, cfg.name, cfg_path, name=decision.name,
                                  attempt=decision.attempt)
        log.info("submitted %s to %s", submitted, type(target).__name__)
        decision = dataclasses.replace(decision, submitted=submitted)
    return decision


def _runs(target: Target, run_name: str, dry_run: bool) -> list:
    """The target's runs of ``run_name``; a dry run works offline (no kube-config, no
    reachable dashboard): it says so in one line and assumes there are none."""
    try:
        return target.runs(run_name)
    except Exception as exc:  # noqa: BLE001 - any client/connection error
        if not dry_run:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("dry run: the cluster is not reachable (%s: %s); assuming it has no runs "
                    "of %s", type(exc).__name__, first[:200], run_name)
        return []


# The base template in a checkout of this repository: what `--dry-run` renders from when it
# runs outside the cluster (from the repository root) and no --template file is given.
OFFLINE_TEMPLATE = "k8s/base/run-template.yaml"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def add_watch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fadrm watch``."""
    from fadrm.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument(
        "--target", choices=("kubernetes", "ray"), default="kubernetes",
        help="kubernetes: create KubeRay RayJobs from --template; "
        "ray: submit to the Ray Jobs API at --address",
    )
    parser.add_argument(
        "--template", default=os.environ.get("FADRM_TEMPLATE", DEFAULT_TEMPLATE),
        help="RayJob template (kubernetes target): raycronjob/NAME reads the suspended "
        "RayCronJob NAME from the API (default %(default)s, the one k8s/base deploys); a "
        "path reads a YAML file with a RayJob, a RayCronJob or `kubectl kustomize` output",
    )
    parser.add_argument(
        "--namespace", default=None,
        help="namespace of the RayJobs (default: $POD_NAMESPACE, else the pod's service "
        "account namespace, else 'default')",
    )
    parser.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
        help="Ray dashboard / Jobs API address (ray target; default $RAY_ADDRESS); the "
        "auth token comes from $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH",
    )
    parser.add_argument(
        "--max-failures", type=int,
        default=_env_int("FADRM_WATCH_MAX_FAILURES", DEFAULT_MAX_FAILURES),
        help="back off after this many failed runs for the same config and teacher "
        "fingerprints: create no more, exit %d (default %%(default)s, "
        "$FADRM_WATCH_MAX_FAILURES; 0 never backs off)" % EXIT_BACKOFF,
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="decide and print what would be submitted or deleted, but change nothing",
    )
    return parser


def run_watch(args: argparse.Namespace) -> int:
    """``fadrm watch``: 0 when the check ran (submitted or not), 3 in back-off (runs for
    these fingerprints failed), 2 on bad input, 1 when the watch itself failed."""
    from fadrm.errors import InputError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    source = args.config
    if not source:
        log.error("a config is required (fadrm watch CONFIG or --config CONFIG)")
        return 2
    if args.max_failures < 0:
        log.error("error: --max-failures must be >= 0, got %d", args.max_failures)
        return 2
    try:
        if args.target == "kubernetes":
            target: Any = KubernetesTarget.from_reference(args.template,
                                                          namespace=args.namespace)
            if args.dry_run and Path(OFFLINE_TEMPLATE).is_file():
                target.offline_template = OFFLINE_TEMPLATE
        else:
            target = RayJobsTarget(args.address)
        decision = watch(source, target, dry_run=args.dry_run,
                         max_failures=args.max_failures)
    except (InputError, FileNotFoundError) as exc:
        log.error("error: %s", exc)
        return 2
    except Exception as exc:  # an unreachable API or storage: fail the (Cron)Job visibly
        log.error("watch failed: %s: %s", type(exc).__name__, exc)
        return 1
    if decision.preview is not None:
        yaml.safe_dump(decision.preview, sys.stdout, sort_keys=False)
    deleted = (f" [deleted {', '.join(decision.stopped)}]" if decision.stopped else "")
    would = (f" [would delete {', '.join(r.name for r in decision.stop)}]"
             if args.dry_run and decision.stop else "")
    print(f"{decision.action}: {decision.reason}"
          + (f" -> {decision.submitted}" if decision.submitted else "") + deleted + would)
    return decision.exit_code
