"""The targets of `fadrm watch`: the clients that talk to a cluster (launch layer).

The library decides (:mod:`fadrm.watch`); these act. ``fadrm watch --target NAME`` finds
them through the ``fadrm.watch_targets`` entry point group (pyproject.toml), so ``fadrm``
never imports this module. Neither target imports its client at module level: the
``watch`` image, which has the ``kubernetes`` package and no Ray, loads ``kubernetes``
without ever importing ``ray``; ``ray`` imports ``ray.job_submission`` when first used.
Nothing here logs credentials: the Kubernetes token and the Ray auth token are read by the
libraries (or sent as a header), never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fadrm.watch import (
    ACTIVE,
    DEFAULT_TEMPLATE,
    DELETING,
    FAILED,
    LABEL_ATTEMPT,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    MANAGER,
    STOPPED,
    SUCCEEDED,
    Decision,
    RunRecord,
    fingerprint_labels,
    label_value,
    lifecycle_problems,
    load_template_file,
    rayjob_name,
    rayjob_record,
    render_rayjob,
    template_from_object,
)

__all__ = ["KubernetesTarget", "RayJobsTarget", "OFFLINE_TEMPLATE"]

# The watch's own logger: the targets' lines read as the watch's in a CronJob's log.
log = logging.getLogger("fadrm.watch")

# The base template in a checkout of this repository: what `--dry-run` renders from when it
# runs outside the cluster (from the repository root) and no --template file is given.
OFFLINE_TEMPLATE = "k8s/base/run-template.yaml"


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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KubernetesTarget:
        """From ``fadrm watch`` arguments: ``--template``, ``--namespace``; a ``--dry-run``
        from a checkout renders from :data:`OFFLINE_TEMPLATE` when the API is out of reach."""
        target = cls.from_reference(args.template, namespace=args.namespace)
        if args.dry_run and Path(OFFLINE_TEMPLATE).is_file():
            target.offline_template = OFFLINE_TEMPLATE
        return target

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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RayJobsTarget:
        """From ``fadrm watch`` arguments: ``--address``."""
        return cls(args.address)

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
