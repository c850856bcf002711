"""The select stage: the initial images of each class block, as the method starts them."""

from __future__ import annotations

from typing import Any

from fadrm import storage
from fadrm.formats import shards
from fadrm.config import SelectConfig
from fadrm.lineage import StageKey
from fadrm.methods import Method
from fadrm.stages.base import Stage, StagePlan, WorkerContext, load_teacher, unit_seed
from fadrm.units import UnitId

__all__ = ["SelectStage"]


class SelectStage(Stage):
    """Initial images P per class block, as ``method`` starts them (realism-scored patches,
    random real images, ...)."""

    name = "select"

    def __init__(self, plan: StagePlan, key: StageKey, method: Method, section: SelectConfig):
        super().__init__(plan, key)
        self.method = method
        self.section = section

    def units(self) -> list[str]:
        return [str(UnitId(b)) for b in range(self.plan.num_blocks)]

    def unit_uri(self, unit: str) -> str:
        return storage.join(self.dir, f"init-{unit}.arrow")

    def setup(self, ctx: WorkerContext) -> Any:
        # The data source decodes only the candidates each class block asks for.
        train = self.plan.source
        teacher = None
        if self.method.select_teacher:
            teacher = load_teacher(self.plan, self.section.teacher, ctx.device)
        return train, teacher

    def run_unit(self, state: Any, unit: str, ctx: WorkerContext) -> None:
        train, teacher = state
        classes = self.plan.block_classes(UnitId.parse(unit).block)
        seed = unit_seed(self.cfg.seed, self.name, "classes")  # per-class seeding inside
        ipc = self.cfg.ipc
        images = self.method.initial_images(train, classes, ipc, seed, self.cfg, teacher,
                                            ctx.device)
        ctx.report(1, 1)
        labels = [c for c in classes for _ in range(ipc)]
        ids = [c * ipc + i for c in classes for i in range(ipc)]
        flat = images.reshape(len(classes) * ipc, *images.shape[2:])
        shards.write_table(self.unit_uri(unit), shards.images_table(flat, labels, ids))
