"""The squeeze stage: train a teacher on the real data (only when it has no weights)."""

from __future__ import annotations

import io
from typing import Any

import torch

from fadrm import storage
from fadrm.formats import shards
from fadrm.config import SqueezeConfig
from fadrm.lineage import StageKey
from fadrm.stages.base import Stage, StagePlan, WorkerContext, teacher_model, unit_seed

__all__ = ["SqueezeStage"]


class SqueezeStage(Stage):
    """Train teacher ``index`` on the real data (only when it has no weights)."""

    name = "squeeze"
    collective = True

    def __init__(self, plan: StagePlan, key: StageKey, index: int, section: SqueezeConfig):
        super().__init__(plan, key)
        self.index = index
        self.section = section

    @property
    def label(self) -> str:
        return f"squeeze[{self.index}]"

    def units(self) -> list[str]:
        return ["teacher"]

    def unit_uri(self, unit: str) -> str:
        return storage.join(self.dir, "teacher.pt")

    def setup(self, ctx: WorkerContext) -> Any:
        source = self.plan.source
        d = self.cfg.data
        if d.kind == "imagefolder" and source.decoded_gib("train") > d.cache_gib:
            # Too large to hold decoded (data.cache_gib): stream it, batch by batch.
            return source.stream("train"), source.split("val")
        return source.split("train"), source.split("val")

    def run_unit(self, state: Any, unit: str, ctx: WorkerContext) -> None:
        from fadrm.squeeze import train_teacher

        train, val = state
        torch.manual_seed(unit_seed(self.cfg.seed, self.name, f"{self.index}"))
        model = teacher_model(self.plan, self.index).to(ctx.device)
        top1 = train_teacher(
            model, train, val, self.section, self.cfg.data, ctx.device,
            seed=unit_seed(self.cfg.seed, self.name, f"{self.index}"), progress=ctx.report,
        )
        if ctx.rank == 0:
            buf = io.BytesIO()
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
            shards.write_json(storage.join(self.dir, "meta.json"), {
                "model": self.cfg.teachers[self.index].model, "val_top1": top1,
                "train_images": len(train), "val_images": len(val),
                "skipped_inputs": train.skipped,
            })
            shards.write_artifact(self.unit_uri(unit), buf.getvalue())
