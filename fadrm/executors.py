"""The in-process executor (tests, debugging); Ray Train's is ``ray_jobs.executor``."""

from __future__ import annotations

import logging
import threading

import torch

from fadrm import leases
from fadrm.amp import resolve_device
from fadrm.errors import DeviceError, InputError
from fadrm.progress import StageProgress
from fadrm.stages.base import Stage, WorkerContext

__all__ = ["LocalExecutor", "local_device"]

log = logging.getLogger("fadrm.executors")


def local_device(exe) -> str:
    """The local executor's ``execution.device``, held to ``execution.use_gpu`` (``exe``, an
    :class:`~fadrm.config.ExecutionConfig`): true asks for a GPU, as it does of the Ray
    executor, so a machine without one is refused before any work (never a silent run on
    the CPU); false means the CPU; null leaves ``execution.device`` to decide."""
    if exe.use_gpu is None:
        return exe.device
    if exe.use_gpu:
        if exe.device == "cpu":
            raise InputError("execution.use_gpu: is true but execution.device is 'cpu'; set "
                             "one of them to agree (device auto or cuda, or use_gpu false)")
        if not torch.cuda.is_available():
            raise DeviceError("execution.use_gpu: is true but this machine has no CUDA GPU "
                              "(local executor); set it to false or null, or run on a GPU node")
        return "cuda"
    if exe.device == "cuda":
        raise InputError("execution.use_gpu: is false but execution.device is 'cuda'; set "
                         "one of them to agree (device auto or cpu, or use_gpu true or null)")
    return "cpu"


class LocalExecutor:
    """Runs every unit in this process (tests, debugging).

    Each unit is computed under a lease (:mod:`fadrm.leases`): a unit that another run on
    the same output is computing is left to it; this run does its other units, then waits
    until that unit's output appears or its lease expires (then takes it over).
    """

    def __init__(self, device: str = "auto", lease_s: float = leases.LEASE_S,
                 poll_s: float = leases.POLL_S):
        self.device = resolve_device(device)
        self.holder = leases.new_holder()
        self.lease_s, self.poll_s = lease_s, poll_s
        self.stop = threading.Event()  # set to end a wait for other runs' units early

    def run_stage(self, stage: Stage, pending: list[str], progress: StageProgress) -> None:
        ranks = stage.cfg.execution.train_workers
        if ranks > 1:  # before any stage: the training stages' keys say `ranks` ranks
            raise InputError(f"execution.train_workers: is {ranks}, but the local executor "
                             f"trains teachers and the student on one rank; set it to 1, "
                             f"or run with the Ray executor")
        # The intra-op threads a Ray worker has (the bytes of CPU arithmetic depend on
        # them; a key holds their number when it is not 1), not this machine's core count.
        threads = torch.get_num_threads()
        torch.set_num_threads(stage.cfg.execution.threads_per_worker)
        try:
            self._run(stage, pending, progress)
        finally:
            torch.set_num_threads(threads)

    def _run(self, stage: Stage, pending: list[str], progress: StageProgress) -> None:
        ctx = WorkerContext(device=self.device)
        state = None
        finished = 0

        def compute(unit: str) -> None:
            nonlocal state
            if state is None:  # load data/teachers only once there is work here
                state = stage.setup(ctx)
            ctx.report = lambda d, t: progress.update(finished + (d / max(t, 1)))
            stage.run_unit(state, unit, ctx)

        waiting, told = list(pending), None
        while waiting:
            held = []
            for unit in waiting:
                outcome = leases.attempt(stage.dir, unit, self.holder,
                                         lambda u=unit: stage.is_done(u),
                                         lambda u=unit: compute(u), self.lease_s)
                if outcome is leases.Outcome.HELD:
                    held.append(unit)
                else:
                    finished += 1
                    progress.update(finished)
            if held and held != told:
                told = held
                log.info("%s: %d unit(s) being computed by another run on this output "
                         "(leased); waiting for them", stage.label, len(held))
            waiting = held
            if waiting and self.stop.wait(self.poll_s):
                raise RuntimeError(f"{stage.label}: stopped while waiting for units that "
                                   f"another run computes: {waiting[:5]}")
