"""Scheduled re-distillation: start a run only when something is stale.

``fadrm watch`` asks the lineage which stages of a run are stale (a teacher checkpoint, the
data or the config changed, or a stage never finished), looks at the runs already active on
a *target*, and submits at most one new run:

* ``submit``               -- some stage is not done and no active run has the same
                              fingerprints;
* ``skip-up-to-date``      -- every stage is done: nothing to do;
* ``skip-already-running`` -- an active run carries the same config and teacher
                              fingerprints (or is an unlabelled run of the same name).

Two targets share one small interface (``active_fingerprints`` / ``submit``):

* :class:`KubernetesTarget` creates a KubeRay ``RayJob`` from a template (the CronJob in
  ``k8s/cronjob.watch.yaml``); the RayJob gets a generated name and the fingerprints as
  labels, which is how a later watch recognises it.
* :class:`RayJobsTarget` submits to a Ray Jobs API address with ``JobSubmissionClient`` (for
  ``ray job submit`` users); the fingerprints travel as job metadata and the run config is
  shipped in the job's ``working_dir``.

The decision (:func:`decide`) and the RayJob rendering (:func:`render_rayjob`) are pure
functions; only the targets talk to a cluster. Nothing here logs credentials: S3 keys, the
Ray auth token and the Kubernetes token are read by the libraries, never printed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import yaml

__all__ = [
    "LABEL_CONFIG",
    "LABEL_TEACHERS",
    "LABEL_RUN",
    "LABEL_MANAGED_BY",
    "MANAGER",
    "Decision",
    "decide",
    "fingerprint_labels",
    "label_value",
    "rayjob_name_prefix",
    "render_rayjob",
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
LABEL_RUN = "fadrm.io/run"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "fadrm-watch"
# Annotation with the human-readable reason a run was started (kubectl describe).
ANNOTATION_REASON = "fadrm.io/reason"

SUBMIT = "submit"
SKIP_UP_TO_DATE = "skip-up-to-date"
SKIP_RUNNING = "skip-already-running"

# KubeRay: a RayJob name is a DNS-1035 label of at most 47 characters (the RayCluster it
# creates appends 6). generateName appends 5 random characters, so the prefix gets 42.
_MAX_RAYJOB_NAME = 47
_GENERATE_SUFFIX = 5
# KubeRay JobDeploymentStatus values after which a RayJob no longer runs anything.
_RAYJOB_TERMINAL = frozenset({"Complete", "Failed"})
# Ray job states of a job that has not finished (ray.job_submission.JobStatus).
_RAY_ACTIVE = frozenset({"PENDING", "RUNNING"})

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class Decision:
    """What the watch decided, why, and (after submitting) what it created."""

    action: str
    """'submit', 'skip-up-to-date' or 'skip-already-running'."""
    reason: str
    labels: dict[str, str] = field(default_factory=dict)
    """The fingerprint labels a submitted run carries (LABEL_CONFIG, LABEL_TEACHERS)."""
    submitted: str | None = None
    """Name of the created RayJob / id of the submitted Ray job; None when nothing was."""
    preview: dict | None = None
    """With ``dry_run``: the object a Kubernetes target would have created."""

    @property
    def should_submit(self) -> bool:
        return self.action == SUBMIT


def label_value(text: str) -> str:
    """``text`` as a valid Kubernetes label value (<= 63 chars of [A-Za-z0-9-_.])."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.")


def fingerprint_labels(status: Any) -> dict[str, str]:
    """The config and teacher fingerprints of ``status`` as labels (validated)."""
    fps = getattr(status, "fingerprints", None) or {}
    labels = {}
    for label, key in ((LABEL_CONFIG, "config"), (LABEL_TEACHERS, "teachers")):
        value = fps.get(key)
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


def decide(status: Any, running: Iterable[dict[str, str]]) -> Decision:
    """Submit, or skip, given the run's staleness and the label dicts of active runs.

    ``status`` is a ``fadrm.lineage.RunStatus`` (or anything with ``up_to_date``, ``stages``
    and ``fingerprints``); ``running`` holds the labels (RayJobs) or metadata (Ray jobs) of
    the active runs of this run name. An active run with the same config and teacher
    fingerprints is this very work already under way; one with other fingerprints is an
    older run that does not produce what is stale now, so it does not block a new one. An
    active run without fingerprints (e.g. the RayJob applied by hand with
    ``kubectl apply -k``) is treated as the same work: starting a second GPU run beside it
    could only duplicate it.
    """
    labels = fingerprint_labels(status)
    running = list(running)
    for other in running:
        if LABEL_CONFIG not in other and LABEL_TEACHERS not in other:
            return Decision(
                SKIP_RUNNING,
                "an active run of this name carries no fingerprints (started by hand?); "
                "not starting a second one beside it",
                labels,
            )
        if all(other.get(k) == v for k, v in labels.items()):
            return Decision(
                SKIP_RUNNING,
                f"a run with the same fingerprints is active "
                f"(config {labels[LABEL_CONFIG]}, teachers {labels[LABEL_TEACHERS]})",
                labels,
            )
    if status.up_to_date:
        return Decision(SKIP_UP_TO_DATE, "every stage is done for the current inputs", labels)
    others = f"; {len(running)} active run(s) have other fingerprints" if running else ""
    return Decision(SUBMIT, (_stale_summary(status) or "stages not done") + others, labels)


# --------------------------------------------------------------------------- rendering


def rayjob_name_prefix(config_name: str) -> str:
    """``generateName`` for a run: ``fadrm-<name>-``, DNS-1035, short enough for KubeRay."""
    slug = re.sub(r"[^a-z0-9-]+", "-", config_name.lower()).strip("-") or "run"
    room = _MAX_RAYJOB_NAME - _GENERATE_SUFFIX - len("fadrm--")
    return f"fadrm-{slug[:room].rstrip('-')}-"


# Server-set metadata that must not be sent on create.
_SERVER_METADATA = (
    "name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink",
    "ownerReferences", "finalizers",
)


def render_rayjob(template: dict, status: Any, config_name: str) -> dict:
    """The RayJob to create for ``status``: a deep copy of ``template`` with a generated
    name and labels carrying the run name and the config/teacher fingerprints."""
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
    meta["generateName"] = rayjob_name_prefix(config_name)
    meta["labels"] = {
        **(meta.get("labels") or {}),
        LABEL_RUN: label_value(config_name),
        **fingerprint_labels(status),
        LABEL_MANAGED_BY: MANAGER,
    }
    annotations = {
        k: v
        for k, v in (meta.get("annotations") or {}).items()
        if k != "kubectl.kubernetes.io/last-applied-configuration"
    }
    summary = _stale_summary(status)
    if summary:
        annotations[ANNOTATION_REASON] = summary
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    return obj


# --------------------------------------------------------------------------- targets


class Target(Protocol):
    """Where runs are submitted; both targets below implement this."""

    def active_fingerprints(self, run_name: str) -> list[dict[str, str]]: ...

    def submit(self, status: Any, config_name: str, config_path: str | Path) -> str: ...


_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubernetesTarget:
    """Create KubeRay RayJobs through the Kubernetes API (``ray.io/v1``, ``rayjobs``).

    Needs get/list/create on rayjobs in ``namespace`` (k8s/rbac.watch.yaml). ``api`` is a
    ``kubernetes.client.CustomObjectsApi``; by default one is built from the in-cluster
    service account, or from ~/.kube/config outside a cluster.
    """

    kind = "kubernetes"

    group, version, plural = "ray.io", "v1", "rayjobs"

    def __init__(self, template: dict, namespace: str | None = None, api: Any = None):
        self.template = template
        self.namespace = namespace or _default_namespace()
        self._api = api

    @classmethod
    def from_file(cls, template_path: str | Path, **kwargs: Any) -> KubernetesTarget:
        template = yaml.safe_load(Path(template_path).read_text())
        return cls(template, **kwargs)

    @property
    def api(self) -> Any:
        if self._api is None:
            try:
                from kubernetes import client, config
            except ImportError as exc:
                from fadrm.errors import MissingDependencyError

                raise MissingDependencyError(
                    "kubernetes", "`fadrm watch --target kubernetes`",
                    "pip install 'fadrm[k8s]' or pip install 'kubernetes<37'") from exc

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.CustomObjectsApi()
        return self._api

    def active_fingerprints(self, run_name: str) -> list[dict[str, str]]:
        """Labels of the RayJobs of ``run_name`` that have not finished."""
        listing = self.api.list_namespaced_custom_object(
            self.group, self.version, self.namespace, self.plural,
            label_selector=f"{LABEL_RUN}={label_value(run_name)}",
        )
        active = []
        for item in listing.get("items", []):
            meta = item.get("metadata") or {}
            state = (item.get("status") or {}).get("jobDeploymentStatus", "")
            if meta.get("deletionTimestamp") or state in _RAYJOB_TERMINAL:
                continue
            active.append(dict(meta.get("labels") or {}))
        return active

    def build(self, status: Any, config_name: str) -> dict:
        """The exact object :meth:`submit` creates."""
        return render_rayjob(self.template, status, config_name)

    def submit(self, status: Any, config_name: str, config_path: str | Path = "") -> str:
        # The RayJob reads its config from the ConfigMap its template mounts (the same
        # ConfigMap the watch reads), so config_path is not needed here.
        body = self.build(status, config_name)
        created = self.api.create_namespaced_custom_object(
            self.group, self.version, self.namespace, self.plural, body
        )
        return (created.get("metadata") or {}).get("name", "")


def _default_namespace() -> str:
    if _SA_NAMESPACE.exists():
        return _SA_NAMESPACE.read_text().strip()
    return "default"


class RayJobsTarget:
    """Submit runs to a Ray cluster's Jobs API (``ray job submit`` users).

    Token auth stays on: the token is taken from ``token``, else ``RAY_AUTH_TOKEN`` or the
    file named by ``RAY_AUTH_TOKEN_PATH``, and sent as a bearer header; without any of them
    Ray's own lookup applies (``RAY_AUTH_MODE=token`` + ``~/.ray/auth_token``). The run
    config is shipped with the job (``working_dir``), so the job runs exactly the config
    the watch evaluated; ``entrypoint`` overrides the default
    ``python -m ray_jobs.distill --config run.yaml``.
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

    def active_fingerprints(self, run_name: str) -> list[dict[str, str]]:
        """Metadata of the pending/running jobs of ``run_name``."""
        active = []
        for job in self.client.list_jobs():
            meta = dict(job.metadata or {})
            state = getattr(job.status, "value", job.status)
            if meta.get(LABEL_RUN) == label_value(run_name) and state in _RAY_ACTIVE:
                active.append(meta)
        return active

    def submit(self, status: Any, config_name: str, config_path: str | Path) -> str:
        metadata = {
            LABEL_RUN: label_value(config_name),
            **fingerprint_labels(status),
            LABEL_MANAGED_BY: MANAGER,
        }
        # Job ids are free-form; this one says what it is: run, config fingerprint, nonce.
        submission_id = (
            f"{rayjob_name_prefix(config_name)}{metadata[LABEL_CONFIG][:12]}-"
            f"{secrets.token_hex(3)}"
        )
        entrypoint = self.entrypoint or "python -m ray_jobs.distill --config run.yaml"
        # Ship the config as working_dir/run.yaml (a fresh folder: nothing else uploaded).
        staging = Path(tempfile.mkdtemp(prefix="fadrm-watch-"))
        try:
            shutil.copyfile(config_path, staging / "run.yaml")
            runtime_env = {**self.runtime_env, "working_dir": str(staging)}
            return self.client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                metadata=metadata,
                runtime_env=runtime_env,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- watch


def _lineage_run_status(cfg: Any) -> Any:
    # Imported late: it pulls in storage backends. Preflight first, so a bad input is an
    # error here, in seconds, instead of a submitted run that fails on the cluster.
    from fadrm.preflight import preflight

    return preflight(cfg, write_probe=False).plan.status()


def watch(
    cfg_path: str | Path,
    target: Target,
    status_fn: Callable[[Any], Any] | None = None,
    *,
    dry_run: bool = False,
) -> Decision:
    """Check staleness of the run in ``cfg_path`` and submit it to ``target`` if needed."""
    from fadrm.config import load_config
    from fadrm.preflight import check_submittable

    cfg = load_config(cfg_path)
    check_submittable(cfg, f"`fadrm watch --target {getattr(target, 'kind', 'cluster')}`")
    status = (status_fn or _lineage_run_status)(cfg)
    for stage in status.stages:
        log.info("stage %-9s %-8s %s", stage.name, stage.state, getattr(stage, "reason", ""))
    # Nothing stale: no need to ask the cluster anything (a scheduler's common case).
    running = [] if status.up_to_date else target.active_fingerprints(cfg.name)
    decision = decide(status, running)
    log.info(
        "run %s: %s (%s) [config %s, teachers %s]",
        cfg.name, decision.action, decision.reason,
        decision.labels[LABEL_CONFIG], decision.labels[LABEL_TEACHERS],
    )
    if decision.should_submit and dry_run:
        build = getattr(target, "build", None)
        if build is not None:
            decision = dataclasses.replace(decision, preview=build(status, cfg.name))
    elif decision.should_submit:
        submitted = target.submit(status, cfg.name, cfg_path)
        log.info("submitted %s to %s", submitted, type(target).__name__)
        decision = dataclasses.replace(decision, submitted=submitted)
    return decision


def add_watch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fadrm watch``."""
    from fadrm.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument(
        "--target", choices=("kubernetes", "ray"), default="kubernetes",
        help="kubernetes: create a KubeRay RayJob from --template; "
        "ray: submit to the Ray Jobs API at --address",
    )
    parser.add_argument(
        "--template", default="/templates/rayjob.yaml",
        help="RayJob YAML to render new runs from (kubernetes target)",
    )
    parser.add_argument(
        "--namespace", default=None,
        help="namespace of the RayJobs (default: the pod's own namespace, else 'default')",
    )
    parser.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
        help="Ray dashboard / Jobs API address (ray target; default $RAY_ADDRESS); the "
        "auth token comes from $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="decide and print what would be submitted, but submit nothing",
    )
    return parser


def run_watch(args: argparse.Namespace) -> int:
    """``fadrm watch``: 0 when the check ran (whether or not it submitted), else 1/2."""
    from fadrm.errors import InputError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    source = args.config
    if not source:
        log.error("a config is required (fadrm watch CONFIG or --config CONFIG)")
        return 2
    try:
        if args.target == "kubernetes":
            target: Any = KubernetesTarget.from_file(args.template, namespace=args.namespace)
        else:
            target = RayJobsTarget(args.address)
        decision = watch(source, target, dry_run=args.dry_run)
    except (InputError, FileNotFoundError) as exc:
        log.error("error: %s", exc)
        return 2
    except Exception as exc:  # an unreachable API or storage: fail the (Cron)Job visibly
        log.error("watch failed: %s: %s", type(exc).__name__, exc)
        return 1
    if decision.preview is not None:
        yaml.safe_dump(decision.preview, sys.stdout, sort_keys=False)
    print(f"{decision.action}: {decision.reason}"
          + (f" -> {decision.submitted}" if decision.submitted else ""))
    return 0
