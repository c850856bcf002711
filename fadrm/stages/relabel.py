"""The relabel stage: soft (or hard) labels, one unit = a block of student epochs."""

from __future__ import annotations

from typing import Any

from fadrm import storage
from fadrm.formats import shards
from fadrm.config import RelabelConfig
from fadrm.datasource import load_distilled
from fadrm.lineage import StageKey
from fadrm.stages.base import Stage, StagePlan, WorkerContext, load_teacher, unit_seed
from fadrm.units import EpochUnit

__all__ = ["RelabelStage"]


class RelabelStage(Stage):
    """Soft labels, one unit = a block of student epochs."""

    name = "relabel"

    def __init__(self, plan: StagePlan, key: StageKey, section: RelabelConfig):
        super().__init__(plan, key)
        self.section = section

    def units(self) -> list[str]:
        e, step = self.section.epochs, self.section.epochs_per_shard
        return [str(EpochUnit(s, min(s + step, e) - 1)) for s in range(0, e, step)]

    def unit_uri(self, unit: str) -> str:
        return storage.join(self.dir, f"labels-{unit}.arrow")

    def unit_for_epoch(self, epoch: int) -> str:
        return self.units()[epoch // self.section.epochs_per_shard]

    def setup(self, ctx: WorkerContext) -> Any:
        images, labels = load_distilled(self.plan)
        teachers = []
        if self.section.label_mode == "soft":  # hard labels need no teacher
            teachers = [load_teacher(self.plan, i, ctx.device)
                        for i in self.cfg.relabel_teachers]
        return images, labels, teachers

    def run_unit(self, state: Any, unit: str, ctx: WorkerContext) -> None:
        from fadrm.relabel import relabel_epochs

        images, labels, teachers = state
        weights = None
        chosen = [self.cfg.teachers[i] for i in self.cfg.relabel_teachers]
        if any(t.ensemble_weight for t in chosen):
            weights = [t.ensemble_weight for t in chosen]
        d = self.cfg.data
        table = relabel_epochs(
            teachers, images, d.mean, d.std, self.section, EpochUnit.parse(unit).epochs,
            seed=unit_seed(self.cfg.seed, self.name, "views"), device=ctx.device,
            weights=weights, progress=ctx.report, labels=labels,
            num_classes=self.plan.num_classes, precision=self.cfg.execution.precision,
            batches_per_forward=self.section.batches_per_forward,
        )
        shards.write_table(self.unit_uri(unit), table)
