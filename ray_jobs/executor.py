"""Run pipeline stages as Ray Train jobs.

Unit stages (select, recover, relabel): a ``UnitQueue`` actor holds the stage's pending
units and every Ray Train worker pulls the next one until none are left, so a worker that
joins or leaves changes speed, not results (a unit's bytes depend only on its id).
Collective stages (teacher and student training) run once on all workers, as DDP.

When Ray Train restarts a failed worker group, the new group announces a fresh
*generation*; units that the old group had taken but not finished go back to the queue.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import deque

import ray
import torch
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fadrm.pipeline import Stage, StageProgress, WorkerContext

log = logging.getLogger("ray_jobs.executor")


@ray.remote(num_cpus=0)
class UnitQueue:
    """Pending units of one stage, handed out one at a time (an async actor)."""

    def __init__(self, units: list[str]):
        import asyncio

        self.pending = deque(units)
        self.in_flight: dict[str, str] = {}  # unit -> generation that took it
        self.inner: dict[str, float] = {}  # unit -> fraction done
        self.done: set[str] = set()
        self.generation: str | None = None
        self.changed = asyncio.Condition()

    async def enter(self, generation: str) -> None:
        if generation == self.generation:
            return
        # A new worker group: whatever the previous one had in flight is orphaned.
        for unit in sorted(self.in_flight, reverse=True):
            self.pending.appendleft(unit)
        self.in_flight.clear()
        self.inner.clear()
        self.generation = generation

    async def next(self, generation: str) -> str | None:
        if generation != self.generation or not self.pending:
            return None
        unit = self.pending.popleft()
        self.in_flight[unit] = generation
        return unit

    async def report(self, unit: str, fraction: float) -> None:
        if unit in self.in_flight:
            self.inner[unit] = fraction

    async def finish(self, unit: str) -> None:
        self.in_flight.pop(unit, None)
        self.inner.pop(unit, None)
        self.done.add(unit)
        async with self.changed:
            self.changed.notify_all()

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def progress(self) -> float:
        return len(self.done) + sum(self.inner.values())

    async def wait_done(self, count: int) -> list[str]:
        """Block until at least ``count`` units are finished; returns the finished ones."""
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.done) >= count)
        return sorted(self.done)


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.collective
    import ray.train.torch

    from fadrm import storage

    stage: Stage = config["stage"]
    queue = config["queue"]
    storage.configure(stage.cfg.storage.endpoint_url, stage.cfg.storage.region)
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    generation = ray.train.collective.broadcast_from_rank_zero(uuid.uuid4().hex)
    ray.get(queue.enter.remote(generation))
    ctx = WorkerContext(rank=rank, world_size=world, device=ray.train.torch.get_device())

    if stage.collective:
        state = stage.setup(ctx)
        for unit in config["units"]:
            if rank == 0:
                ctx.report = lambda d, t, u=unit: queue.report.remote(u, d / max(t, 1))
                ray.get(queue.next.remote(generation))
            stage.run_unit(state, unit, ctx)
            ray.train.collective.barrier()
            if rank == 0:
                ray.get(queue.finish.remote(unit))
        return

    state = None
    while (unit := ray.get(queue.next.remote(generation))) is not None:
        if state is None:  # load data/teachers only once there is work for this worker
            state = stage.setup(ctx)
        ctx.report = lambda d, t, u=unit: queue.report.remote(u, d / max(t, 1))
        stage.run_unit(state, unit, ctx)
        ray.get(queue.finish.remote(unit))


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
        from ray_jobs.distill import connect

        # Connect only when there is work: an up-to-date re-run never starts Ray.
        connect(self.exe.address, self.exe.threads_per_worker, self.exe.max_workers)
        # The queue lives on the driver's node: losing a worker node must never lose the
        # queue (the driver's own node going away ends the job anyway).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        queue = UnitQueue.options(scheduling_strategy=here).remote(pending)
        if self.on_queue is not None:
            self.on_queue(stage, queue)
        # More workers than units would only idle; collective stages use the full range.
        hi = self.exe.max_workers if stage.collective else min(self.exe.max_workers, len(pending))
        lo = min(self.exe.min_workers, hi)
        num_workers = hi if lo == hi else (lo, hi)
        if self.exe.worker_start_timeout_s is not None:
            # Ray Train propagates this from the driver to its controller.
            os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(
                self.exe.worker_start_timeout_s)
        use_gpu = self._use_gpu()
        resources = {"CPU": self.exe.threads_per_worker}
        if use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"stage": stage, "queue": queue, "units": pending,
                               "threads": self.exe.threads_per_worker},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=f"fadrm-{stage.name}-{stage.key.key}-{uuid.uuid4().hex[:6]}",
                storage_path=self.storage_path,
                failure_config=FailureConfig(max_failures=self.exe.max_failures),
                # Ray Train's worker-group bookkeeping at INFO drowns the stage progress;
                # its warnings and errors (failures, retries, resizes) still show.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        stop = threading.Event()

        def poll() -> None:
            # Refreshes the driver's progress bar; results never depend on this thread.
            while not stop.wait(0.5):
                try:
                    progress.update(ray.get(queue.progress.remote(), timeout=5))
                except Exception:  # noqa: BLE001 - display only
                    pass

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            trainer.fit()
        finally:
            stop.set()
            poller.join()
            progress.update(ray.get(queue.progress.remote()))
            ray.kill(queue)
