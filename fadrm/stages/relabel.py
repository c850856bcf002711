"""The relabel stage: soft (or hard) labels, one unit = a block of student epochs."""

from __future__ import annotations

from typing import Any

from fadrm import shards, storage
from fadrm.datasource import load_distilled
from fadrm.stages.base import Stage, WorkerContext, load_teacher, unit_seed

__all__ = ["RelabelStage"]


class RelabelStage(Stage):
    """Soft labels, one unit = a block of student epochs."""

    name = "relabel"

    def units(self) -> list[str]:
        e, step = self.cfg.relabel.epochs, self.cfg.relabel.epochs_per_shard
        return [f"e{s:04d}-{min(s + step, e) - 1:04d}" for s in range(0, e, step)]

    def unit_uri(self, unit: str) -> str:
        return storage.join(self.dir, f"labels-{unit}.arrow")

    def unit_for_epoch(self, epoch: int) -> str:
        return self.units()[epoch // self.cfg.relabel.epochs_per_shard]

    def setup(self, ctx: WorkerContext) -> Any:
        images, labels = load_distilled(self.plan)
        teachers = []
        if self.cfg.relabel.label_mode == "soft":  # hard labels need no teacher
            teachers = [load_teacher(self.plan, i, ctx.device)
                        for i in self.cfg.relabel_teachers]
        return images, labels, teachers

    def run_unit(self, state: Any, unit: str, ctx: WorkerContext) -> None:
        from fadrm.relabel import relabel_epochs

        images, labels, teachers = state
        first, last = (int(x) for x in unit[1:].split("-"))
        weights = None
        chosen = [self.cfg.teachers[i] for i in self.cfg.relabel_teachers]
        if any(t.ensemble_weight for t in chosen):
            weights = [t.ensemble_weight for t in chosen]
        d = self.cfg.data
        table = relabel_epochs(
            teachers, images, d.mean, d.std, self.cfg.relabel, range(first, last + 1),
            seed=unit_seed(self.cfg.seed, self.name, "views"), device=ctx.device,
            weights=weights, progress=ctx.report, labels=labels,
            num_classes=self.plan.num_classes,
        )
        shards.write_table(self.unit_uri(unit), table)
