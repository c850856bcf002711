"""The in-process executor (tests, debugging); Ray Train's is ``ray_jobs.executor``."""

from __future__ import annotations

from fadrm.amp import resolve_device
from fadrm.progress import StageProgress
from fadrm.stages.base import Stage, WorkerContext

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Runs every unit in this process (tests, debugging)."""

    def __init__(self, device: str = "auto"):
        self.device = resolve_device(device)

    def run_stage(self, stage: Stage, pending: list[str], progress: StageProgress) -> None:
        ctx = WorkerContext(device=self.device)
        state = stage.setup(ctx)
        for done, unit in enumerate(pending):
            ctx.report = lambda d, t, _done=done: progress.update(_done + (d / max(t, 1)))
            stage.run_unit(state, unit, ctx)
            progress.update(done + 1)
