"""Run pipeline stages as Ray Train jobs.

Unit stages (select, recover, relabel): a ``UnitQueue`` actor holds the stage's pending
units and every Ray Train worker pulls the next one until none are left, so a worker that
joins or leaves changes speed, not results (a unit's bytes depend only on its id).
Collective stages (teacher and student training) run on ``execution.train_workers`` ranks:
rank 0 alone (the default), or a group of exactly that many workers, as DDP (their bytes
depend on the number, which their keys hold). Every unit is computed under a lease
(:mod:`fadrm.leases`): one that another run on the same output holds is deferred in the
queue, not computed twice.

When Ray Train restarts a failed worker group, the new group announces a fresh
*generation*; units that the old group had taken but not finished go back to the queue.

Only failures of the run itself (a lost worker or node, an out-of-memory kill) are worth a
restart. A bad input (:class:`~fadrm.errors.InputError`: config, data, weights) fails the
same way on every attempt, so a worker that meets one records it in the queue and stops
instead of raising: the other workers find no more units, the stage ends at once, and the
driver raises the recorded error, once. A damaged output that a worker reads
(:class:`~fadrm.formats.shards.ShardCorruptError`) is recorded the same way, with its uri:
the driver raises it as such, and the run regenerates that output, as under the local
executor (:func:`fadrm.runner.run_pipeline`).

The driver runs ``trainer.fit()`` in a thread and watches it: progress, one line a minute
while no worker group could start (workers or GPUs not there yet), a bound on that wait
(``execution.resource_wait_s``), and Ctrl-C, which ends the run within seconds (finished
units are in storage already; the same command resumes).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid

import ray
import torch
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fadrm import leases
from fadrm.errors import InputError
from fadrm.formats.shards import ShardCorruptError
from fadrm.progress import StageProgress
from fadrm.stages import Stage, WorkerContext
from ray_jobs.queue import QueueState, UnitQueue
from ray_jobs.teardown import abandon

log = logging.getLogger("ray_jobs.executor")


def _worker_loop(config: dict) -> None:
    """One worker of the group: the stages in order, each to its end on every worker.

    A stage is over for a worker once every unit of it is finished by *some* worker (its
    queue says so); only then does the next stage start, whose units read the outputs of
    this one. A restarted group (a lost worker, an elastic resize) runs the same function
    again: stages whose units are all done pass at once, and the stage that was running
    resumes with the units its queue still holds.
    """
    import ray.train
    import ray.train.collective
    import ray.train.torch

    from fadrm import storage

    parts: list[tuple[Stage, object, int]] = config["stages"]
    cfg = parts[0][0].cfg
    storage.use(storage.Storage.from_config(cfg.storage))
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    generation = ray.train.collective.broadcast_from_rank_zero(uuid.uuid4().hex)
    ctx = WorkerContext(rank=rank, world_size=world, device=ray.train.torch.get_device())
    holder = leases.new_holder()  # this worker process's claims on units
    for stage, queue, total in parts:
        ray.get(queue.enter.remote(generation))
        run = _collective_part if stage.collective else _unit_part
        run(stage, queue, generation, ctx, holder)
        # Every unit finished (by any worker), or a bad input recorded: then all stop.
        ray.get(queue.wait_done.remote(total))
        if ray.get(queue.state.remote()).failure is not None:
            return


def _collective_part(stage: Stage, queue, generation: str, ctx: WorkerContext,
                     holder: str) -> None:
    """A stage that trains (squeeze, evaluate): its units one after the other, on
    ``execution.train_workers`` ranks (their bytes and keys depend on that number): one,
    rank 0 alone (the others wait for the stage's end, as for any stage), or all ranks of
    the group, which then has exactly that many workers (see ``_group_size``), as DDP."""
    import ray.train.collective

    wanted = stage.cfg.execution.train_workers
    if wanted == 1:  # every worker takes units and trains each alone (a student matrix)
        _train_alone(stage, queue, generation, ctx, holder)
        return
    if ctx.world_size != wanted:  # the group is sized to it: never train on another count
        raise RuntimeError(f"{stage.label}: {ctx.world_size} workers, but "
                           f"execution.train_workers is {wanted}")
    # Every rank sets up, then all learn together whether one met a bad input (a rank
    # that returned early would leave the others waiting in a collective forever).
    try:
        state = stage.setup(ctx)
    except (InputError, ShardCorruptError) as exc:
        _record_failure(queue, exc)
    ray.train.collective.barrier()
    if ray.get(queue.state.remote()).failure is not None:
        return
    # What is left (all ranks agree: rank 0's view); a restarted group skips done units.
    units = ray.train.collective.broadcast_from_rank_zero(ray.get(queue.todo.remote()))
    for unit in units:
        lease = None
        if ctx.rank == 0:
            ctx.report = lambda d, t, u=unit: queue.report.remote(u, d / max(t, 1))
            ray.get(queue.next.remote(generation))
            # Another run on the same output may hold this unit: then wait for its output.
            lease = leases.claim_when_free(stage.dir, unit, holder,
                                           lambda u=unit: stage.is_done(u))
        try:
            if ray.train.collective.broadcast_from_rank_zero(lease is not None):
                try:
                    stage.run_unit(state, unit, ctx)
                except ShardCorruptError as exc:  # every rank reads the same shards
                    _record_failure(queue, exc)
                    return
            ray.train.collective.barrier()
        finally:
            if lease is not None:
                lease.release()
        if ctx.rank == 0:
            ray.get(queue.finish.remote(unit))


def _train_alone(stage: Stage, queue, generation: str, ctx: WorkerContext,
                 holder: str) -> None:
    """A training stage on one rank per unit: each worker takes the next unit and trains
    it as a single process would (no DDP, whole data sets), so the units of an evaluation
    matrix run side by side while each keeps the bytes of a run of its own."""
    from fadrm.training import alone

    solo = WorkerContext(rank=0, world_size=1, device=ctx.device)
    with alone():
        _unit_part(stage, queue, generation, solo, holder)


def _unit_part(stage: Stage, queue, generation: str, ctx: WorkerContext,
               holder: str) -> None:
    """A stage of independent units: take the next one until the queue is empty. Each is
    computed under a lease (:mod:`fadrm.leases`); one that another run on the same output
    is computing goes back to the queue for a while (done by then, or taken over)."""
    state = None

    def compute(unit: str) -> None:
        nonlocal state
        if state is None:  # load data/teachers only once there is work for this worker
            state = stage.setup(ctx)
        ctx.report = lambda d, t: queue.report.remote(unit, d / max(t, 1))
        stage.run_unit(state, unit, ctx)

    try:
        while (unit := ray.get(queue.next.remote(generation))) is not None:
            outcome = leases.attempt(stage.dir, unit, holder, lambda u=unit: stage.is_done(u),
                                     lambda u=unit: compute(u))
            if outcome is leases.Outcome.HELD:
                ray.get(queue.defer.remote(unit, leases.POLL_S))
            else:
                ray.get(queue.finish.remote(unit))
    except (InputError, ShardCorruptError) as exc:
        _record_failure(queue, exc)


def _record_failure(queue, exc: Exception) -> None:
    """A failure that every attempt would meet again, recorded in the queue instead of
    raised (no restart): a bad input, or a damaged output with its uri."""
    uri = exc.uri if isinstance(exc, ShardCorruptError) else None
    ray.get(queue.fail.remote(str(exc), uri))


def _group_size(exe, work: list[tuple[Stage, list[str]]]) -> int | tuple[int, int]:
    """Workers of a group: exactly ``execution.train_workers`` when it trains on several
    ranks (a training stage's bytes depend on their number, which its key holds), else the
    elastic range, capped by the units (more workers than units would only idle)."""
    if exe.train_workers > 1 and any(stage.collective for stage, _ in work):
        return exe.train_workers
    units = [len(pending) for _, pending in work]  # one rank per unit when training alone
    hi = min(exe.max_workers, max(units, default=1))
    lo = min(exe.min_workers, hi)
    return hi if lo == hi else (lo, hi)


class StageFailed(RuntimeError):
    """A stage's workers failed after every retry; the message is the first worker's error."""


class ResourceWaitTimeout(RuntimeError):
    """No worker group could start within ``execution.resource_wait_s``."""


def _unwrap(exc: BaseException, label: str) -> BaseException:
    """Ray Train's failure as one readable error: the first worker's own exception."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank = min(failures)
        inner = failures[rank]
        cause = getattr(inner, "cause", None)  # a RayTaskError wraps the user's exception
        inner = cause if isinstance(cause, BaseException) else inner
        if isinstance(inner, InputError):
            return InputError(f"{label}: {inner}")
        if isinstance(inner, ShardCorruptError):  # met outside a unit: the run repairs it
            return ShardCorruptError(f"{label}: {inner}", inner.uri)
        lines = str(inner).strip().splitlines()
        text = lines[0] if lines else ""
        return StageFailed(f"{label}: worker {rank} failed after retries: "
                           f"{type(inner).__name__}: {text}")
    failure = getattr(exc, "controller_failure", None)
    if failure is not None:
        return StageFailed(f"{label}: Ray Train controller failed: "
                           f"{type(failure).__name__}: {failure}")
    return exc


def connect(address: str | None, threads: int, max_workers: int) -> None:
    from ray_jobs.ray_logs import hide_known_noise

    hide_known_noise()  # Ray Train's harmless PreemptionWatcher ERROR line, once per stage
    if ray.is_initialized():
        return
    # ray.init replaces the SIGTERM handler (exit 15 at once); the caller's one (the CLI's:
    # stop like Ctrl-C, workers shut down, exit 143) is put back once it has connected.
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _init(address, threads, max_workers)
    finally:
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)


def _init(address: str | None, threads: int, max_workers: int) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Embedded instance: enough CPUs for the worker range even on a small machine
        # (workers are mostly single-threaded; oversubscribing 2 cores is fine).
        cpus = max(os.cpu_count() or 1, threads * max_workers + 1)
        # Ray's helpers (Ray Train's PlacementGroupCleaner, the state API) find "their"
        # cluster by RAY_ADDRESS, else by scanning the machine, which fails with "Found
        # multiple active Ray instances" while another run is going. So this instance gets
        # a port chosen here, and its workers get RAY_ADDRESS naming it: two runs on one
        # machine share nothing.
        port = _free_port()
        gcs_address = f"127.0.0.1:{port}"
        saved = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            # The dashboard serves Ray's state API, which Ray Train uses to clean up after
            # its controller; it listens on 127.0.0.1 only and Ray's token auth stays on.
            # address="local": always a new instance, never a cluster that `ray start` or
            # another program left on this machine (ray.init() alone would join that one).
            ray.init(address="local", num_cpus=cpus, include_dashboard=True,
                     dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": {"RAY_ADDRESS": gcs_address}},
                     log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
        finally:
            if saved is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = saved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayTrainExecutor:
    """Runs each stage with a Ray Train ``TorchTrainer`` on the connected Ray cluster."""

    def __init__(self, cfg, storage_path: str | None = None, on_queue=None):
        self.exe = cfg.execution
        self.storage_path = storage_path
        # on_queue(stage, queue): lets an observer (a test, a UI) follow a stage's units.
        self.on_queue = on_queue

    def _use_gpu(self) -> bool:
        if self.exe.use_gpu is not None:
            return self.exe.use_gpu
        return ray.cluster_resources().get("GPU", 0) > 0

    def run_stage(self, stage: Stage, pending: list[str], progress: StageProgress) -> None:
        """One stage on a worker group of its own."""
        self._run_group([(stage, pending)], _OneStage(progress))

    def run_stages(self, work: list[tuple[Stage, list[str]]], clock) -> None:
        """The run's stages (each with its pending units), in order.

        ``execution.worker_group: shared`` (default): one worker group runs them all, so
        workers start (and pods are scheduled) once, not once per stage.
        ``per_stage``: a group per stage. ``clock`` (:class:`fadrm.runner.StageClock`) is
        told when each stage begins and ends.
        """
        if not work:
            return
        groups = [work] if self.exe.worker_group == "shared" else [[w] for w in work]
        for group in groups:
            self._run_group(group, clock)

    def _run_group(self, work: list[tuple[Stage, list[str]]], clock) -> None:
        # Connect only when there is work: an up-to-date re-run never starts Ray.
        connect(self.exe.address, self.exe.threads_per_worker, self.exe.max_workers)
        if self.exe.use_gpu and not self.exe.address and not os.environ.get("RAY_ADDRESS") \
                and ray.cluster_resources().get("GPU", 0) == 0:
            # The embedded instance is this machine: no GPU can appear later.
            raise InputError("execution.use_gpu: is true but this machine has no GPU that Ray "
                             "can see (embedded local Ray); set it to false or null, or give "
                             "execution.address of a cluster with GPUs")
        # The queues live on the driver's node: losing a worker node must never lose them
        # (the driver's own node going away ends the job anyway).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        queues = []
        for stage, pending in work:
            queues.append(UnitQueue.options(scheduling_strategy=here).remote(pending))
            if self.on_queue is not None:
                self.on_queue(stage, queues[-1])
        num_workers = _group_size(self.exe, work)
        if self.exe.worker_start_timeout_s is not None:
            # Ray Train propagates this from the driver to its controller.
            os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(
                self.exe.worker_start_timeout_s)
        use_gpu = self._use_gpu()
        resources = {"CPU": self.exe.threads_per_worker}
        if use_gpu:
            resources["GPU"] = 1
        first = work[0][0]
        name = first.name if len(work) == 1 else f"{first.name}-to-{work[-1][0].name}"
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={
                "stages": [(stage, queue, len(pending))
                           for (stage, pending), queue in zip(work, queues)],
                "threads": self.exe.threads_per_worker,
            },
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=f"fadrm-{name}-{first.key.key}-{uuid.uuid4().hex[:6]}",
                storage_path=self.storage_path,
                failure_config=FailureConfig(max_failures=self.exe.max_failures),
                # Ray Train's worker-group bookkeeping at INFO drowns the stage progress;
                # its warnings and errors (failures, retries, resizes) still show.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        try:
            self._fit(trainer, work, queues, clock, num_workers, resources)
        finally:
            if ray.is_initialized():  # not after a Ctrl-C or a wait that ran out
                for queue in queues:
                    ray.kill(queue)

    def _fit(self, trainer, work: list[tuple[Stage, list[str]]], queues: list, clock,
             num_workers, resources: dict) -> None:
        """``trainer.fit()`` in a thread; this thread follows the stages one by one (their
        progress, begin and end), reports (and bounds) waiting for workers, and turns
        Ctrl-C into a prompt stop."""
        label = work[0][0].label  # the group starts with this stage
        outcome: dict[str, BaseException] = {}

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - handed to the driver thread
                outcome["error"] = exc

        runner = threading.Thread(target=fit, name=f"fadrm-{work[0][0].name}-fit", daemon=True)
        limit = self.exe.resource_wait_s
        every = _WAIT_NOTE_S if limit is None else min(_WAIT_NOTE_S, limit / 4)
        start = time.monotonic()
        next_note = start + every
        started = False
        current = 0  # index of the stage being followed
        failed = corrupt = None
        progress = clock.begin(*work[0])
        runner.start()
        try:
            while True:
                alive = runner.is_alive()
                if alive:
                    runner.join(0.5)
                stage, pending = work[current]
                try:
                    state = ray.get(queues[current].state.remote(), timeout=5)
                except Exception:  # noqa: BLE001 - display only; the fit thread decides
                    state = QueueState(progress.done, started, None, 0)
                progress.update(state.done)
                if state.failure is not None:
                    # Every worker stops at a recorded failure; the group ends by itself.
                    failed, corrupt = f"{stage.label}: {state.failure}", state.corrupt_uri
                    break
                if current == 0 and state.started and not started:
                    rest = (f" (the same group runs the next {len(work) - 1} stages)"
                            if len(work) > 1 else "")
                    log.info("%s: workers started after %.0f s%s", label,
                             time.monotonic() - start, rest)
                started = started or state.started
                if state.finished >= len(pending):
                    # This stage is complete; the next one (if any) starts on the same group.
                    progress.close()
                    clock.end(stage)
                    current += 1
                    if current == len(work):
                        break
                    progress = clock.begin(*work[current])
                    continue
                if not alive:
                    break
                now = time.monotonic()
                if not started and now >= next_note:
                    # Through logging, so a progress bar on the terminal stays intact.
                    log.warning("%s", _waiting_line(label, num_workers, resources, now - start))
                    next_note = now + every
                if not started and limit is not None and now - start > limit:
                    raise ResourceWaitTimeout(
                        f"{label}: no worker group could start within "
                        f"execution.resource_wait_s={limit:g} s "
                        f"({_ask(num_workers, resources)}); add nodes or raise that limit")
        except BaseException:
            progress.close()
            abandon(runner)  # bounded: Ray's processes are killed if its shutdown lingers
            raise
        runner.join()
        progress.close()
        if failed is not None:
            raise InputError(failed) if corrupt is None else ShardCorruptError(failed, corrupt)
        if "error" in outcome:
            raise _unwrap(outcome["error"], work[min(current, len(work) - 1)][0].label) \
                from outcome["error"]
        if current < len(work):
            clock.end(work[current][0])  # raises: units missing after the group ended


class _OneStage:
    """A clock for one stage whose progress the caller made (``run_stage``)."""

    def __init__(self, progress: StageProgress):
        self.progress = progress

    def begin(self, stage: Stage, pending: list[str]) -> StageProgress:
        return self.progress

    def end(self, stage: Stage) -> None:
        pass


# The driver says once a minute what a stage waits for, while it waits.
_WAIT_NOTE_S = 60.0


def _ask(num_workers, resources: dict) -> str:
    lo = num_workers[0] if isinstance(num_workers, tuple) else num_workers
    per = ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()))
    return f"{lo} worker(s) of {per} each asked"


def _waiting_line(label: str, num_workers, resources: dict, waited: float) -> str:
    try:
        free = ray.available_resources()
    except Exception:  # noqa: BLE001 - the note is best effort
        free = {}
    have = ", ".join(f"{free.get(k, 0):g} {k}" for k in sorted(resources))
    return (f"{label}: waiting {waited / 60:.0f} min for workers: {_ask(num_workers, resources)}, "
            f"{have} available now; the autoscaler may be adding nodes "
            f"(execution.resource_wait_s bounds the wait)")
