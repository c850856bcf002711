"""`fadrm watch`: the check-and-act loop and its command-line arguments.

:func:`watch` asks the lineage what is stale, asks a *target* for its runs, lets
:func:`fadrm.watch.decision.decide` choose, and has the target act. The targets talk to a
cluster, so they live in the launch layer (``ray_jobs.watch_targets``: ``kubernetes``
creates KubeRay RayJobs, ``ray`` submits to a Ray Jobs API) and the library finds them
through the ``fadrm.watch_targets`` entry point group, as it finds executors: it never
imports ``ray_jobs``, ``kubernetes`` or ``ray`` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from fadrm.watch.decision import (
    ACTIVE,
    BACKOFF,
    DEFAULT_MAX_FAILURES,
    EXIT_BACKOFF,
    LABEL_CONFIG,
    LABEL_TEACHERS,
    Decision,
    RunRecord,
    decide,
)
from fadrm.watch.rayjob import DEFAULT_TEMPLATE

__all__ = ["TARGETS", "Target", "create_target", "watch", "add_watch_arguments", "run_watch"]

log = logging.getLogger("fadrm.watch")

TARGETS = ("kubernetes", "ray")
"""The targets of `fadrm watch --target` (entry points of group ``fadrm.watch_targets``)."""
_ENTRY_POINTS = "fadrm.watch_targets"


class Target(Protocol):
    """Where runs are submitted (``ray_jobs.watch_targets`` has the two shipped ones).

    A target class registered under ``fadrm.watch_targets`` is built with
    ``from_args(args)`` from the parsed ``fadrm watch`` arguments; it may have
    ``build(status, config_name, *, name, attempt) -> dict`` (what ``submit`` would send,
    shown by ``--dry-run``) and a ``kind`` (its ``--target`` name, for messages)."""

    def runs(self, run_name: str) -> list[RunRecord]: ...

    def submit(self, status: Any, config_name: str, config_path: str | Path, *,
               name: str, attempt: int) -> str: ...

    def stop(self, run: RunRecord) -> bool: ...

    def record_backoff(self, config_name: str, decision: Decision) -> None: ...

    def reset_hint(self, config_name: str, decision: Decision) -> str: ...


def create_target(name: str, args: argparse.Namespace) -> Target:
    """The target called ``name`` (an entry point of group ``fadrm.watch_targets``), built
    from the parsed ``fadrm watch`` arguments."""
    from importlib.metadata import entry_points

    from fadrm.errors import InputError, MissingDependencyError

    found = {ep.name: ep for ep in entry_points(group=_ENTRY_POINTS)}
    if name not in found:
        raise InputError(f"--target: unknown watch target {name!r}; installed: "
                         f"{sorted(found) or 'none (install the package: pip install .)'}")
    try:
        factory = found[name].load()
    except ImportError as exc:
        raise MissingDependencyError(exc.name or name, f"`fadrm watch --target {name}`") \
            from exc
    return factory.from_args(args)


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
    from fadrm.plan import config_fingerprint

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


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def add_watch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fadrm watch``."""
    from fadrm.config import add_config_argument

    add_config_argument(parser)
    parser.add_argument(
        "--target", choices=TARGETS, default="kubernetes",
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
        target = create_target(args.target, args)
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