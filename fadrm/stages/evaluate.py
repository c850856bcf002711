"""The evaluate stage: train a fresh student on the distilled set only; evaluate it on real
validation data."""

from __future__ import annotations

import io
import os
import re
import socket
from typing import Any

import torch

from fadrm import storage
from fadrm.formats import shards
from fadrm.config import StudentConfig
from fadrm.datasource import load_distilled
from fadrm.lineage import StageKey
from fadrm.stages.base import (Stage, StagePlan, WorkerContext, json_bytes, load_teacher,
                               unit_seed)

__all__ = ["EvaluateStage"]


HEADLINE = "student"
"""The unit of today's one student (files metrics.json, student.pt)."""


def matrix_unit(model: str, seed: int) -> str:
    """A (model, seed) unit of the evaluation matrix, as a file-name-safe name."""
    return f"{re.sub(r'[^A-Za-z0-9_.]+', '_', model)}-s{seed}"


class EvaluateStage(Stage):
    """Train a fresh student on the distilled set only; evaluate on real validation data.

    One unit per (student model, student seed) of the evaluation matrix, or the one unit
    ``student`` when the config names one model and no seeds (today's files and bytes).
    Each unit trains on one rank unless ``execution.train_workers`` asks for DDP, so the
    Ray executor spreads the units over its workers."""

    name = "evaluate"
    collective = True

    def __init__(self, plan: StagePlan, key: StageKey, section: StudentConfig):
        super().__init__(plan, key)
        self.section = section
        if section.is_matrix:
            seeds = section.seeds if section.seeds is not None else [self.cfg.seed]
            self.matrix = {matrix_unit(m, s): (m, s) for m in section.models for s in seeds}
        else:
            self.matrix = {HEADLINE: (section.models[0], self.cfg.seed)}

    def units(self) -> list[str]:
        return list(self.matrix)

    def unit_uri(self, unit: str) -> str:
        name = "metrics.json" if unit == HEADLINE else f"metrics-{unit}.json"
        return storage.join(self.dir, name)

    def weights_uri(self, unit: str) -> str:
        name = "student.pt" if unit == HEADLINE else f"student-{unit}.pt"
        return storage.join(self.dir, name)

    def unit_metrics(self) -> dict[str, dict]:
        """Every unit's metrics, in the matrix's order (models, then seeds)."""
        return {u: shards.read_json(self.unit_uri(u)) for u in self.matrix}

    def setup(self, ctx: WorkerContext) -> Any:
        # Only the validation set is decoded, each rank its strided share (the counts are
        # summed over ranks): the student never sees a real training image.
        val = self.plan.source.split("val", shard=(ctx.rank, ctx.world_size))
        images, _ = load_distilled(self.plan)
        return val, images

    def run_unit(self, state: Any, unit: str, ctx: WorkerContext) -> None:
        from fadrm.metrics import evaluate
        from fadrm.models import create_model
        from fadrm.student import train_student

        val, images = state
        cfg, d = self.cfg, self.cfg.data
        relabel = self.plan.relabel
        cache: dict[str, Any] = {}

        def labels_for_epoch(epoch: int):
            u = relabel.unit_for_epoch(epoch)
            if u not in cache:
                cache.clear()
                cache[u] = shards.read_table(relabel.unit_uri(u))
            return cache[u]

        model_name, student_seed = self.matrix[unit]
        # Seeded as the one-student run of that seed is: a unit's bytes are that run's.
        seed = unit_seed(student_seed, self.name, HEADLINE)
        torch.manual_seed(seed)
        model = create_model(
            model_name, self.plan.num_classes, in_chans=d.channels,
            image_size=d.resolution, small_stem=self.section.small_stem,
        ).to(ctx.device)
        result = train_student(
            model, images, labels_for_epoch, val, self.section, relabel.section.epochs,
            d.mean, d.std, self.plan.num_classes, ctx.device, seed=seed, progress=ctx.report,
            val_is_shard=ctx.world_size > 1, precision=cfg.execution.precision,
        )
        # Every rank holds a share of the validation set: the counts are summed over ranks.
        # The teachers are measured once, by the headline unit (the first).
        teacher_top1 = [evaluate(load_teacher(self.plan, i, ctx.device), val, d.mean, d.std,
                                 ctx.device, sharded=ctx.world_size > 1)[0]
                        for i in range(len(cfg.teachers))] if unit == self.units()[0] else []
        if ctx.rank != 0:
            return
        buf = io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
        shards.write_artifact(self.weights_uri(unit), buf.getvalue())
        metrics = {
            "student_top1": result["top1"],
            "student_top5": result["top5"],
            "student_top1_best": result["top1_best"],
            "best_epoch": result["best_epoch"],
            "history": result["history"],
            "student_steps": result["steps"],
            "student_train_seconds": round(result["train_seconds"], 3),
            "student_workers": ctx.world_size,
            "teacher_top1": teacher_top1[0] if teacher_top1 else None,
            "teachers_top1": teacher_top1,
            "train_images": self.plan.source.count("train"),
            "val_images": self.plan.source.count("val"),
            "skipped_inputs": self.plan.squeeze_skipped() + val.skipped,
        }
        if result["step"]["protocol"] != "paper":
            # The data-parallel student is a protocol variant: say so (the paper's step
            # adds nothing, so its metrics keep their bytes).
            metrics["student_step"] = result["step"]
        if unit != HEADLINE:
            # Which worker trained it: matrix units spread over a cluster's workers.
            metrics.update(student_model=model_name, student_seed=student_seed,
                           worker=f"{socket.gethostname()}:{os.getpid()}")
        shards.write_artifact(self.unit_uri(unit), json_bytes(metrics))
