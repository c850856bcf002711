"""The re-distillation decision: which runs exist, and what to do about them.

Pure functions and records, no cluster client: :func:`decide` takes the lineage's staleness
(a ``fadrm.lineage.RunStatus``) and the runs a target reported (:class:`RunRecord`) and
returns a :class:`Decision`; :func:`rayjob_name` derives the deterministic run name from the
fingerprints. The package docstring (:mod:`fadrm.watch`) says what each decision means.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from fadrm.errors import EXIT_RUN_FAILED

__all__ = [
    "LABEL_CONFIG",
    "LABEL_TEACHERS",
    "LABEL_DATA",
    "LABEL_RUN",
    "LABEL_ATTEMPT",
    "LABEL_MANAGED_BY",
    "MANAGER",
    "SUBMIT",
    "SKIP_UP_TO_DATE",
    "SKIP_RUNNING",
    "BACKOFF",
    "ACTIVE",
    "SUCCEEDED",
    "FAILED",
    "STOPPED",
    "DELETING",
    "DEFAULT_MAX_FAILURES",
    "EXIT_BACKOFF",
    "SUSPENDED_WARN_S",
    "RunRecord",
    "Decision",
    "decide",
    "fingerprint_labels",
    "label_value",
    "rayjob_name",
    "rayjob_name_prefix",
    "stale_summary",
]

# Labels (RayJobs) / metadata keys (Ray jobs) that identify what a run was started for.
LABEL_CONFIG = "fadrm.io/config"
LABEL_TEACHERS = "fadrm.io/teachers"
LABEL_DATA = "fadrm.io/data"
LABEL_RUN = "fadrm.io/run"
LABEL_ATTEMPT = "fadrm.io/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "fadrm-watch"

SUBMIT = "submit"
SKIP_UP_TO_DATE = "skip-up-to-date"
SKIP_RUNNING = "skip-already-running"
BACKOFF = "backoff"

DEFAULT_MAX_FAILURES = 2
"""Failed runs for one set of fingerprints after which the watch stops creating runs."""
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


def stale_summary(status: Any) -> str:
    """'recover: stale (teachers[0] changed); relabel: missing' for the stages not done."""
    parts = []
    for stage in getattr(status, "stages", []):
        if stage.state != "done":
            why = f" ({stage.reason})" if getattr(stage, "reason", "") else ""
            parts.append(f"{stage.name}: {stage.state}{why}")
    report = getattr(status, "report", "current")
    if report != "current":
        why = getattr(status, "report_reason", "")
        parts.append(f"report: {report}" + (f" ({why})" if why else ""))
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
    return Decision(SUBMIT, (stale_summary(status) or "stages not done") + before + more
                    + tail, failures=failures, **common)
