"""Running a config: preflight, the stages that are not complete, the report.

The one place that turns a config into work, for every entrypoint (``fadrm run`` / ``demo``,
``python -m ray_jobs.distill``, the GPU check). *Where* units run is the executor's
business: ``local`` (every unit in this process, :class:`fadrm.executors.LocalExecutor`) is
built in; others (``ray``: Ray Train, in ``ray_jobs``) are found through the
``fadrm.executors`` entry point group, so the library never imports its Ray layer.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from typing import Any

from fadrm import storage
from fadrm.config import RunConfig
from fadrm.errors import InputError, MissingDependencyError
from fadrm.executors import LocalExecutor, local_device
from fadrm.plan import RunPlan, latest_dir, report_dir
from fadrm.preflight import check_inputs, check_plan
from fadrm.progress import StageProgress
from fadrm.formats import shards
from fadrm.report import point_latest, write_report

__all__ = ["EXECUTORS", "StageClock", "create_executor", "run_config", "run_pipeline",
           "run_scores",
           "repair_outputs", "print_summary"]

log = logging.getLogger("fadrm.pipeline")

EXECUTORS = ("ray", "local")
_ENTRY_POINTS = "fadrm.executors"


def create_executor(cfg: RunConfig, name: str = "ray") -> Any:
    """The executor called ``name``: 'local' (every unit in this process, on
    ``execution.device``, held to ``execution.use_gpu``; needs no Ray) or one registered under the ``fadrm.executors``
    entry points ('ray': Ray Train on an embedded or remote Ray cluster)."""
    if name == "local":
        return LocalExecutor(local_device(cfg.execution))
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=_ENTRY_POINTS)}
    if name not in found:
        raise InputError(f"--executor: unknown executor {name!r}; installed: "
                         f"{sorted(['local', *found])}")
    try:
        factory = found[name].load()
    except ImportError as exc:
        raise MissingDependencyError(
            exc.name or "ray", f"the {name!r} executor (the default of `fadrm run`)",
            "pip install 'ray[train]'; or run in this process with --executor local"
        ) from exc
    return factory(cfg)


def run_config(cfg: RunConfig, executor: str = "ray", show_progress: bool = True) -> dict:
    """Run every stage of ``cfg`` that is not complete; returns the run's metrics."""
    return run_pipeline(cfg, create_executor(cfg, executor), show_progress=show_progress)


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"  # reused output of a build that did not record its time
    return f"{value:.1f}s" if value < 10 else f"{value:.0f}s"


def print_summary(cfg: RunConfig, metrics: dict, file=None) -> None:
    """The run's result in a few lines (what every entrypoint prints at the end)."""
    file = file or sys.stdout
    cached = set(metrics.get("cached_stages", []))
    stages = ", ".join(f"{k} {_seconds(v)}" + (" (cached)" if k in cached else "")
                       for k, v in metrics["stage_seconds"].items())
    epochs = metrics.get("epochs", cfg.relabel.epochs)
    print(f"\n== {cfg.name}: {metrics['method']} IPC{metrics['ipc']} "
          f"({metrics['num_images']} images, {metrics['num_classes']} classes) ==", file=file)
    print(f"  teacher top-1        {metrics['teacher_top1']:6.2f} %", file=file)
    # best_epoch is stored counting from 0; said here as "after epoch N of E" (from 1).
    print(f"  student top-1 final  {metrics['student_top1']:6.2f} %   "
          f"(best {metrics['student_top1_best']:.2f} % after epoch "
          f"{metrics['best_epoch'] + 1} of {epochs}; top-5 {metrics['student_top5']:.2f} %)",
          file=file)
    step = metrics.get("student_step")
    if step:  # a protocol variant: never mistaken for the paper's figure
        print(f"  student step         data-parallel (not the paper's): "
              f"{step['batches_per_step']} stored batches per step on {step['ranks']} "
              f"rank(s), lr {step['peak_lr']:.3g} ({step['lr_scaling']} rule, "
              f"{step['warmup_epochs']} warm-up epochs)", file=file)
    for model, row in (metrics.get("students") or {}).items():
        margin = row.get("margin_over_random_real")
        print(f"  {'student ' + model:<20} {row['top1_mean']:6.2f} +- {row['top1_std']:.2f} % "
              f"over seeds {row['seeds']} (best {row['top1_best_mean']:.2f} %)"
              + (f", {margin:+.2f} vs random real" if margin is not None else ""), file=file)
    scores = metrics.get("scores")
    if scores:
        print(f"  scores (DD-Ranking)  LRS {scores['lrs']:.2f} %, IOR {scores['ior']:+.2f}, "
              f"HLR {scores['hlr']:.2f}   (random real {scores['random_real_top1']:.2f} %; "
              f"hard labels: full data {scores['real_hard_top1']:.2f} %, distilled "
              f"{scores['syn_hard_top1']:.2f} %)", file=file)
    print(f"  stage seconds        {stages}", file=file)  # cached: an earlier run's time
    for line in metrics.get("warnings") or []:  # reports of earlier builds have none
        print(f"  warning              {line}", file=file)
    print(f"  report               {report_dir(cfg)}/ (metrics.json, manifest.json, "
          f"grid.png; newest: {latest_dir(cfg)})", file=file)


def repair_outputs(plan: RunPlan, full: bool = True) -> list[dict]:
    """Find complete outputs whose bytes do not match their checksum; discard them.

    Their units become pending again and are regenerated; since a unit's bytes depend only
    on its id, the regenerated shard equals the lost one and nothing downstream changes.
    """
    damaged = []
    for stage in plan.stages:
        for unit in stage.units():
            uri = stage.unit_uri(unit)
            if not shards.is_complete(uri):
                continue
            problem = shards.check(uri, full=full)
            if problem:
                log.warning("%s: damaged output %s (%s); regenerating it",
                            stage.label, uri, problem)
                shards.discard(uri)
                damaged.append({"stage": stage.label, "uri": uri, "problem": problem})
    return damaged


class StageClock:
    """Times the stages of a run as an executor starts and ends them, with their progress.

    An executor that runs several stages at once (one worker group for all) calls
    ``begin`` and ``end`` as each stage starts and finishes; ``end`` checks that every unit
    is in storage and records the stage's seconds beside its outputs. Each time a unit
    finishes, the time so far is kept there too (as this run's, ``attempt``), so a run
    killed without a chance to say so leaves it for the run that resumes the stage.
    """

    def __init__(self, timings: dict[str, float | None], show_progress: bool = True):
        self.timings, self.show_progress = timings, show_progress
        self.attempt = uuid.uuid4().hex[:12]  # this run, in the stages' timing.json
        self._start: dict[str, float] = {}  # stages begun and not ended
        self._pending: dict[str, int] = {}
        self._stages: dict[str, Any] = {}

    def begin(self, stage, pending: list[str]) -> StageProgress:
        label = stage.label
        log.info("%s: %d of %d units to do (key %s)", label, len(pending), len(stage.units()),
                 stage.key.key)
        self._start[label], self._pending[label] = time.perf_counter(), len(pending)
        self._stages[label] = stage
        progress = StageProgress(label, len(pending), enabled=self.show_progress)
        return _Checkpointed(progress, lambda: self._checkpoint(stage))

    def _checkpoint(self, stage) -> None:
        start = self._start.get(stage.label)
        if start is None:
            return
        try:
            stage.checkpoint_seconds(self.attempt, time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - a timing must never fail the run
            log.debug("%s: could not keep its time so far: %s", stage.label, exc)

    def end(self, stage) -> None:
        label = stage.label
        missing = stage.pending()
        if missing:
            raise RuntimeError(f"{label}: {len(missing)} units still missing after the stage "
                               f"ran: {missing[:5]}")
        seconds = round(time.perf_counter() - self._start.pop(label), 2)
        count = self._pending[label]
        stage.record_seconds(seconds, count, self.attempt)
        # The whole stage: earlier partial runs (and repairs, and killed runs up to their
        # last finished unit) of this output add up.
        self.timings[label] = stage.recorded_seconds() or seconds
        log.info("%s: %d units in %.1f s (%.2f units/s)", label, count, seconds,
                 count / max(seconds, 1e-9))

    def interrupted(self) -> None:
        """The run stops (Ctrl-C, SIGTERM, a failure): keep the seconds spent on the stages
        begun and not ended beside their outputs, so the run that resumes them reports the
        whole stage's time, not only its own part."""
        for stage_label, start in list(self._start.items()):
            stage = self._stages.get(stage_label)
            if stage is None:
                continue
            try:
                stage.record_seconds(round(time.perf_counter() - start, 2), 0, self.attempt)
            except Exception as exc:  # noqa: BLE001 - the run's own error matters more
                log.debug("%s: could not record its partial time: %s", stage_label, exc)
        self._start.clear()


class _Checkpointed:
    """A stage's progress (:class:`StageProgress`) that calls ``on_unit`` each time the
    count of finished units grows (executors report finished units, with the running
    units' fractions)."""

    def __init__(self, progress: StageProgress, on_unit):
        self.progress, self.on_unit = progress, on_unit
        self.finished = 0

    def update(self, done: float) -> None:
        self.progress.update(done)
        if int(done) > self.finished:
            self.finished = int(done)
            self.on_unit()

    def close(self) -> None:
        self.progress.close()

    def __getattr__(self, name: str):
        return getattr(self.progress, name)


def run_pipeline(cfg: RunConfig, executor: Any, show_progress: bool = True) -> dict:
    """Run every stage that is not complete, then write the run report. Returns metrics.

    The inputs are checked first (:mod:`fadrm.preflight`: output writable, data; then the
    plan built on the checked data, and its teachers), so bad input fails in seconds,
    before any stage. When every stage is already
    complete and this config's report matches the current stage keys, nothing is computed
    or rewritten: the previous metrics are returned ("up to date"). Stages whose outputs an
    earlier run computed are "cached" in the report, with the seconds they took then.
    """
    inputs = check_inputs(cfg)
    plan = RunPlan(cfg, inputs.source)
    check_plan(plan, inputs)
    damaged = repair_outputs(plan, full=cfg.execution.verify_outputs)
    # One look at what is done (every unit's sidecar; on S3 a request each): a stage's
    # units become complete only when that stage runs, so the list holds until then.
    todo = {s.label: s.pending() for s in plan.stages}
    if any(todo.values()):
        plan.source.write_index(cfg.output)  # workers read it instead of listing again
    if not damaged and not any(todo.values()):
        if plan.report_state(plan.previous_manifest())[0] == "current":
            log.info("%s: up to date, nothing to do (report: %s)", cfg.name, plan.run_dir)
            point_latest(plan)
            return shards.read_json(storage.join(plan.run_dir, "metrics.json"))
    timings: dict[str, float | None] = {}
    ran: set[str] = set()
    clock = StageClock(timings, show_progress)
    for attempt in range(MAX_REPAIR_ROUNDS + 1):
        if attempt:
            todo = {s.label: s.pending() for s in plan.stages}
        work = [(s, todo[s.label]) for s in plan.stages if todo[s.label]]
        ran.update(s.label for s, _ in work)
        try:
            _run_work(executor, work, clock)
            break
        except shards.ShardCorruptError as exc:
            # A complete output found damaged when a later stage read it (a same-size
            # corruption that sizes alone do not show): discard it and compute what is
            # pending again -- its unit, then the stages that were reading it.
            if attempt == MAX_REPAIR_ROUNDS or not _is_output(plan, exc.uri):
                raise
            log.warning("%s; regenerating it in this run", exc)
            clock.interrupted()  # the part of the stage that ran counts
            shards.discard(exc.uri)
            damaged.append({"stage": _stage_of(plan, exc.uri), "uri": exc.uri,
                            "problem": str(exc)})
        except BaseException:
            clock.interrupted()  # a resumed stage reports its whole time
            raise
    cached: list[str] = []
    for stage in plan.stages:
        if stage.label not in ran:
            # Reused: reported as cached, with the time it took when it was computed.
            timings[stage.label] = stage.recorded_seconds()
            cached.append(stage.label)
            log.info("%s: up to date (%s), cached", stage.label, stage.key.key)
    timings = {s.label: timings.get(s.label) for s in plan.stages}  # the plan's order
    scores = run_scores(plan, executor, show_progress) if cfg.evaluate.scores else None
    return write_report(plan, timings, damaged, cached, scores)


def run_scores(plan: RunPlan, executor: Any, show_progress: bool = True) -> dict:
    """The label-robust scores of ``plan``'s finished run (:mod:`fadrm.scores`): runs what
    they need that is not done yet (each cached by its own keys), then the formula."""
    from fadrm.scores import label_robust_score, score_configs

    cfg = plan.cfg
    runs = score_configs(cfg)
    syn = shards.read_json(plan.evaluate.unit_uri(plan.evaluate.units()[0]))["student_top1"]
    top1, reports = {"syn": syn}, {}
    for role in ("random_real", "syn_hard"):
        other = runs[role]
        if other is None:  # this run plays the role itself
            top1[role] = syn
            continue
        log.info("%s: scores need %s (%s)", cfg.name, other.name, role)
        top1[role] = run_pipeline(other, executor, show_progress)["student_top1"]
        reports[role] = report_dir(other)
    top1["real_hard"] = _full_data_top1(runs["real_hard"], executor, show_progress)
    w = cfg.evaluate.score_weight
    return {
        "definition": "DD-Ranking label-robust score (arXiv 2505.13300); see fadrm.scores",
        "weight": w,
        **{f"{role}_top1": value for role, value in top1.items()},
        **label_robust_score(top1["real_hard"], top1["syn_hard"], syn, top1["random_real"], w),
        "reports": reports,
    }


def _full_data_top1(cfg: RunConfig, executor: Any, show_progress: bool) -> float:
    """Top-1 of ``cfg``'s first teacher trained by its squeeze stage (run only that stage)."""
    inputs = check_inputs(cfg)
    plan = RunPlan(cfg, inputs.source)
    check_plan(plan, inputs)
    stage = plan.squeeze_stage(0)
    pending = stage.pending()
    if pending:
        log.info("%s: training %s on the full training set (hard labels)", cfg.name,
                 cfg.teachers[0].model)
        plan.source.write_index(cfg.output)
        _run_work(executor, [(stage, pending)], StageClock({}, show_progress))
    return shards.read_json(storage.join(stage.dir, "meta.json"))["val_top1"]


MAX_REPAIR_ROUNDS = 3
"""Damaged outputs met while running that one run regenerates (more: storage is failing)."""


def _run_work(executor: Any, work: list, clock: StageClock) -> None:
    run_stages = getattr(executor, "run_stages", None)
    if run_stages is not None:
        run_stages(work, clock)  # e.g. one Ray Train worker group for all of them
        return
    for stage, pending in work:
        progress = clock.begin(stage, pending)
        try:
            executor.run_stage(stage, pending, progress)
        finally:
            progress.close()
        clock.end(stage)


def _stage_of(plan: RunPlan, uri: str | None) -> str | None:
    """The label of the stage whose unit output ``uri`` is (None: not a stage's output,
    e.g. a teacher's given weights, which a run must never delete)."""
    for stage in plan.stages:
        if any(stage.unit_uri(u) == uri for u in stage.units()):
            return stage.label
    return None


def _is_output(plan: RunPlan, uri: str | None) -> bool:
    return uri is not None and _stage_of(plan, uri) is not None
