"""The recover stage: data residual matching, one unit = (class block, IPC index), or a
group of `recover.ipc_per_forward` IPC indices optimised in one forward."""

from __future__ import annotations

from typing import Any

import torch

from fadrm import storage
from fadrm.formats import shards
from fadrm.config import RecoverConfig
from fadrm.data import normalize
from fadrm.lineage import StageKey
from fadrm.methods import Method
from fadrm.stages.base import Stage, StagePlan, WorkerContext, load_teacher, unit_seed
from fadrm.units import UnitId

__all__ = ["RecoverStage"]


class RecoverStage(Stage):
    """Data residual matching, one unit = (class block, IPC index or group of indices)."""

    name = "recover"

    def __init__(self, plan: StagePlan, key: StageKey, method: Method, section: RecoverConfig):
        super().__init__(plan, key)
        self.method = method
        self.section = section

    def units(self) -> list[str]:
        """One unit per (class block, group of ``recover.ipc_per_forward`` IPC indices),
        named by the group's first index: with 2 per forward ``b003-i0004`` holds indices 4
        and 5 (with 1, the default, one unit per index)."""
        return [str(UnitId(b, i)) for b in range(self.plan.num_blocks)
                for i in range(0, self.cfg.ipc, self.section.ipc_per_forward)]

    def indices(self, unit: str) -> range:
        """The IPC indices that ``unit`` optimises together (the last group may be short)."""
        first = UnitId.parse(unit).index
        if first is None:
            raise ValueError(f"recover: unit {unit!r} names no IPC index")
        return range(first, min(first + self.section.ipc_per_forward, self.cfg.ipc))

    def unit_uri(self, unit: str) -> str:
        return storage.join(self.dir, f"images-{unit}.arrow")

    def setup(self, ctx: WorkerContext) -> Any:
        teachers = [load_teacher(self.plan, i, ctx.device) for i in self.cfg.recover_teachers]
        return {"teachers": teachers, "init": {}}

    def _init(self, state: dict, block: int, index: int) -> torch.Tensor:
        d = self.cfg.data
        classes = self.plan.block_classes(block)
        if self.plan.select is None:  # no select stage (SRe2L): the method's noise
            seed = unit_seed(self.cfg.seed, "noise", "classes")  # per-class seeding inside
            return self.method.noise(classes, self.cfg, seed)[:, index]
        if block not in state["init"]:
            table = shards.read_table(self.plan.select.unit_uri(str(UnitId(block))))
            state["init"] = {block: shards.table_images(table)}
        images, _, ids = state["init"][block]
        rows = [int((ids == c * self.cfg.ipc + index).nonzero()) for c in classes]
        return normalize(images[rows], d.mean, d.std)

    def run_unit(self, state: Any, unit: str, ctx: WorkerContext) -> None:
        from fadrm.data import denormalize
        from fadrm.synthesis import recover

        block = UnitId.parse(unit).block
        indices = self.indices(unit)
        classes = self.plan.block_classes(block)
        d = self.cfg.data
        # Group-major: one image per class for each index, as recover's groups are.
        init = torch.cat([self._init(state, block, i) for i in indices])
        labels = torch.tensor(classes * len(indices), device=ctx.device)
        # Each index keeps the seed its one-at-a-time unit has, so a grouped unit gives
        # those units' images up to float rounding.
        seeds = [unit_seed(self.cfg.seed, self.name, str(UnitId(block, i))) for i in indices]
        result = recover(
            init.to(ctx.device), labels, state["teachers"], self.section, d.mean, d.std,
            d.resolution, seed=seeds[0] if len(seeds) == 1 else seeds, device=ctx.device,
            progress=ctx.report, precision=self.cfg.execution.precision,
        )
        images = denormalize(result.images.cpu(), d.mean, d.std)
        ids = [c * self.cfg.ipc + i for i in indices for c in classes]
        shards.write_table(self.unit_uri(unit),
                           shards.images_table(images, classes * len(indices), ids))
