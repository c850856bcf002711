"""The stage graph: squeeze -> select -> recover -> relabel -> evaluate.

A :class:`RunPlan` turns a :class:`RunConfig` into stages (running them, with preflight and
the report, is :mod:`fadrm.runner`'s). Each stage has a content key
(:mod:`fadrm.lineage`), a list of deterministic work units, and a worker-side
``setup`` / ``run_unit`` pair. Executors (in-process here, Ray Train in ``ray_jobs``) only
decide *where* units run; what a unit computes depends on (run seed, unit id) alone, so its
bytes do not depend on the worker, the number of workers or retries.

Stages whose ``collective`` flag is set (teacher and student training) run once on all
workers together (DDP when there are several); the others are pulled unit by unit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from fadrm import __version__, shards, storage
from fadrm.amp import resolve_device
from fadrm.config import RunConfig, config_to_dict
from fadrm.data import normalize
from fadrm.datasource import load_distilled
from fadrm.lineage import RunStatus, StageKey, StageStatus, diff_components

log = logging.getLogger("fadrm.pipeline")

__all__ = ["WorkerContext", "Stage", "RunPlan", "LocalExecutor", "StageProgress", "unit_seed"]


def unit_seed(run_seed: int, stage: str, unit: str) -> int:
    """A 31-bit seed derived from (run seed, stage, unit id) only."""
    h = hashlib.sha256(f"{run_seed}/{stage}/{unit}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


@dataclass
class WorkerContext:
    """What a stage needs to know about the worker it runs on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[int, int], None] = lambda done, total: None
    """Progress inside the current unit (steps done, steps total)."""


# --------------------------------------------------------------------------- stages


class Stage:
    """A stage of the run: a key, work units, and how a worker computes one unit."""

    name: str = ""
    collective: bool = False

    def __init__(self, plan: "RunPlan", key: StageKey):
        self.plan = plan
        self.key = key

    @property
    def cfg(self) -> RunConfig:
        return self.plan.cfg

    @property
    def dir(self) -> str:
        return storage.join(self.cfg.output, self.name, self.key.key)

    @property
    def label(self) -> str:
        """The stage's name in reports and status (``squeeze[i]`` per teacher)."""
        return self.name

    def units(self) -> list[str]:
        raise NotImplementedError

    def unit_uri(self, unit: str) -> str:
        raise NotImplementedError

    def is_done(self, unit: str) -> bool:
        return shards.is_complete(self.unit_uri(unit))

    def pending(self) -> list[str]:
        return [u for u in self.units() if not self.is_done(u)]

    def setup(self, ctx: WorkerContext) -> Any:
        """Per-worker state loaded once (data, teachers)."""
        return None

    def run_unit(self, state: Any, unit: str, ctx: WorkerContext) -> None:
        raise NotImplementedError

    def outputs(self) -> list[dict]:
        """Sidecar info of every completed unit (for the manifest)."""
        rows = []
        for unit in self.units():
            info = shards.shard_info(self.unit_uri(unit))
            if info is not None:
                rows.append({"stage": self.name, "uri": self.unit_uri(unit), **info})
        return rows


def _teacher_model(plan: "RunPlan", index: int):
    from fadrm.models import create_model

    t = plan.cfg.teachers[index]
    d = plan.cfg.data
    return create_model(
        t.model, plan.num_classes, in_chans=d.channels, image_size=d.resolution,
        small_stem=t.small_stem, pretrained=t.pretrained,
    )


def _load_teacher(plan: "RunPlan", index: int, device: torch.device) -> torch.nn.Module:
    from fadrm.models import load_weights

    model = _teacher_model(plan, index)
    uri = plan.teacher_uri(index)
    if uri is not None:
        # One read (none when the plan holds the bytes): it returns the bytes' sha256.
        digest = load_weights(model, uri, plan.teacher_bytes(index))
        expected = plan.teacher_sha256(index)
        if expected is not None and digest != expected:
            raise shards.ShardCorruptError(
                f"{uri}: sha256 {digest[:12]}... does not match recorded {expected[:12]}..."
            )
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class SqueezeStage(Stage):
    """Train teacher ``index`` on the real data (only when it has no weights)."""

    name = "squeeze"
    collective = True

    def __init__(self, plan: "RunPlan", key: StageKey, index: int):
        super().__init__(plan, key)
        self.index = index

    @property
    def label(self) -> str:
        return f"squeeze[{self.index}]"

    def units(self) -> list[str]:
        return ["teacher"]

    def unit_uri(self, unit: str) -> str:
        return storage.join(self.dir, "teacher.pt")

    def setup(self, ctx: WorkerContext) -> Any:
        source = self.plan.source
        return source.split("train"), source.split("val")

    def run_unit(self, state: Any, unit: str, ctx: WorkerContext) -> None:
        from fadrm.squeeze import train_teacher

        train, val = state
        torch.manual_seed(unit_seed(self.cfg.seed, self.name, f"{self.index}"))
        model = _teacher_model(self.plan, self.index).to(ctx.device)
        top1 = train_teacher(
            model, train, val, self.cfg.squeeze, self.cfg.data, ctx.device,
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


class SelectStage(Stage):
    """Initial images P per class block: realism-scored patches or random real images."""

    name = "select"

    def units(self) -> list[str]:
        return [f"b{b:03d}" for b in range(self.plan.num_blocks)]

    def unit_uri(self, unit: str) -> str:
        return storage.join(self.dir, f"init-{unit}.arrow")

    def setup(self, ctx: WorkerContext) -> Any:
        # The data source decodes only the candidates each class block asks for.
        train = self.plan.source
        teacher = None
        if self.cfg.recover.spec.init == "patches":
            teacher = _load_teacher(self.plan, self.cfg.select.teacher, ctx.device)
        return train, teacher

    def run_unit(self, state: Any, unit: str, ctx: WorkerContext) -> None:
        from fadrm.patches import random_real, select_patches

        train, teacher = state
        classes = self.plan.block_classes(int(unit[1:]))
        seed = unit_seed(self.cfg.seed, self.name, "classes")  # per-class seeding inside
        ipc = self.cfg.ipc
        if teacher is None:
            images = random_real(train, classes, ipc, seed)
        else:
            d = self.cfg.data
            images = select_patches(
                teacher, train, classes, ipc, self.cfg.select, d.mean, d.std, seed, ctx.device
            )
        ctx.report(1, 1)
        labels = [c for c in classes for _ in range(ipc)]
        ids = [c * ipc + i for c in classes for i in range(ipc)]
        flat = images.reshape(len(classes) * ipc, *images.shape[2:])
        shards.write_table(self.unit_uri(unit), shards.images_table(flat, labels, ids))


class RecoverStage(Stage):
    """Data residual matching, one unit = (class block, IPC index)."""

    name = "recover"

    def units(self) -> list[str]:
        return [f"b{b:03d}-i{i:04d}" for b in range(self.plan.num_blocks)
                for i in range(self.cfg.ipc)]

    def unit_uri(self, unit: str) -> str:
        return storage.join(self.dir, f"images-{unit}.arrow")

    def setup(self, ctx: WorkerContext) -> Any:
        teachers = [_load_teacher(self.plan, i, ctx.device) for i in self.cfg.recover_teachers]
        return {"teachers": teachers, "init": {}}

    def _init(self, state: dict, block: int, index: int) -> torch.Tensor:
        d = self.cfg.data
        classes = self.plan.block_classes(block)
        if self.plan.select is None:  # SRe2L: Gaussian noise in normalised space
            from fadrm.patches import noise_init

            seed = unit_seed(self.cfg.seed, "noise", "classes")  # per-class seeding inside
            noise = noise_init(classes, self.cfg.ipc, d.channels, d.resolution, seed)
            return noise[:, index]
        if block not in state["init"]:
            table = shards.read_table(self.plan.select.unit_uri(f"b{block:03d}"))
            state["init"] = {block: shards.table_images(table)}
        images, _, ids = state["init"][block]
        rows = [int((ids == c * self.cfg.ipc + index).nonzero()) for c in classes]
        return normalize(images[rows], d.mean, d.std)

    def run_unit(self, state: Any, unit: str, ctx: WorkerContext) -> None:
        from fadrm.data import denormalize
        from fadrm.synthesis import recover

        block, index = int(unit[1:4]), int(unit.split("-i")[1])
        classes = self.plan.block_classes(block)
        d = self.cfg.data
        init = self._init(state, block, index)
        result = recover(
            init.to(ctx.device), torch.tensor(classes, device=ctx.device), state["teachers"],
            self.cfg.recover, d.mean, d.std, d.resolution,
            seed=unit_seed(self.cfg.seed, self.name, unit), device=ctx.device,
            progress=ctx.report,
        )
        images = denormalize(result.images.cpu(), d.mean, d.std)
        ids = [c * self.cfg.ipc + index for c in classes]
        shards.write_table(self.unit_uri(unit), shards.images_table(images, classes, ids))


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
            teachers = [_load_teacher(self.plan, i, ctx.device)
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


class EvaluateStage(Stage):
    """Train a fresh student on the distilled set only; evaluate on real validation data."""

    name = "evaluate"
    collective = True

    def units(self) -> list[str]:
        return ["student"]

    def unit_uri(self, unit: str) -> str:
        return storage.join(self.dir, "metrics.json")

    def setup(self, ctx: WorkerContext) -> Any:
        # Only the validation set is decoded: the student never sees a real training image.
        val = self.plan.source.split("val")
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

        seed = unit_seed(cfg.seed, self.name, unit)
        torch.manual_seed(seed)
        model = create_model(
            cfg.student.model, self.plan.num_classes, in_chans=d.channels,
            image_size=d.resolution, small_stem=cfg.student.small_stem,
        ).to(ctx.device)
        result = train_student(
            model, images, labels_for_epoch, val, cfg.student, cfg.relabel.epochs,
            d.mean, d.std, self.plan.num_classes, ctx.device, seed=seed, progress=ctx.report,
        )
        if ctx.rank != 0:
            return
        teacher_top1 = []
        for i in range(len(cfg.teachers)):
            teacher = _load_teacher(self.plan, i, ctx.device)
            teacher_top1.append(evaluate(teacher, val, d.mean, d.std, ctx.device)[0])
        buf = io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
        shards.write_artifact(storage.join(self.dir, "student.pt"), buf.getvalue())
        metrics = {
            "student_top1": result["top1"],
            "student_top5": result["top5"],
            "student_top1_best": result["top1_best"],
            "best_epoch": result["best_epoch"],
            "history": result["history"],
            "student_steps": result["steps"],
            "student_train_seconds": round(result["train_seconds"], 3),
            "student_workers": ctx.world_size,
            "teacher_top1": teacher_top1[0],
            "teachers_top1": teacher_top1,
            "train_images": self.plan.source.count("train"),
            "val_images": len(val),
            "skipped_inputs": self.plan.squeeze_skipped() + val.skipped,
        }
        shards.write_artifact(self.unit_uri(unit), _json_bytes(metrics))


def _json_bytes(obj: Any) -> bytes:
    import json

    return json.dumps(obj, indent=2, sort_keys=True).encode()


# --------------------------------------------------------------------------- plan


class RunPlan:
    """The stages of one run, with their content keys."""

    def __init__(self, cfg: RunConfig, source: Any = None):
        from fadrm.datasource import DataSource

        self.cfg = cfg
        storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
        # One listing of the data per plan: classes, fingerprint, and what workers decode.
        self.source = source if source is not None else DataSource(cfg.data)
        self.classes = self.source.classes
        self.num_classes = len(self.classes)
        block = cfg.recover.class_block_size or self.num_classes
        self.block_size = min(block, self.num_classes)
        self.num_blocks = -(-self.num_classes // self.block_size)
        self.data_fp = self.source.fingerprint
        d = cfg.data
        self._data = {"fingerprint": self.data_fp, "resolution": d.resolution,
                      "channels": d.channels, "mean": d.mean, "std": d.std}

        self._plan_teachers()
        self._plan_stages()

    def _plan_teachers(self) -> None:
        """Each teacher's fingerprint, and a squeeze stage for every teacher to train."""
        cfg = self.cfg
        self.squeeze: dict[int, SqueezeStage] = {}
        self._teacher_fp: list[str] = []
        # Given weights, read once here (fingerprint, preflight's fit check, and the stages
        # of an in-process executor); never pickled to Ray workers, which read the URI.
        self._weights: dict[int, bytes] = {}
        for i, t in enumerate(cfg.teachers):
            if t.weights and storage.is_url(t.weights):
                # Pinned (required for URLs): the pin is the fingerprint; the bytes are
                # downloaded when first needed, once per machine (fadrm.models.read_pinned).
                self._teacher_fp.append(f"sha256:{t.sha256}")
            elif t.weights:
                from fadrm.models import read_pinned

                self._weights[i] = read_pinned(t.weights, t.sha256, f"teachers[{i}].weights")
                self._teacher_fp.append("sha256:" + storage.sha256_bytes(self._weights[i]))
            elif t.pretrained:
                from fadrm.models import pretrained_fingerprint

                self._teacher_fp.append(pretrained_fingerprint(t.model))
            else:
                key = StageKey("squeeze", {
                    "teacher": {"model": t.model, "small_stem": t.small_stem},
                    "squeeze": dataclasses.asdict(cfg.squeeze), "data": self._data,
                    "seed": cfg.seed, "index": i, "version": __version__,
                })
                self.squeeze[i] = SqueezeStage(self, key, i)
                self._teacher_fp.append(f"squeeze:{key.key}")

    def _plan_stages(self) -> None:
        """select -> recover -> relabel -> evaluate, each keyed by what its output depends on
        (a baseline without selection or without pixel optimisation skips that stage)."""
        cfg, d = self.cfg, self.cfg.data
        spec = cfg.recover.spec
        self.select: SelectStage | None = None
        if spec.init != "noise":
            comp = {"init": spec.init, "ipc": cfg.ipc, "seed": cfg.seed, "data": self._data,
                    "block_size": self.block_size, "version": __version__}
            if spec.init == "patches":
                comp["select"] = dataclasses.asdict(cfg.select)
                comp["teacher"] = self._teacher_fp[cfg.select.teacher]
            self.select = SelectStage(self, StageKey("select", comp))

        self.recover: RecoverStage | None = None
        if spec.optimize:
            recover_cfg = dataclasses.asdict(cfg.recover)
            recover_cfg.pop("allow_no_bn")  # a permission, not an input: same bytes either way
            self.recover = RecoverStage(self, StageKey("recover", {
                "recover": recover_cfg,
                "init": self.select.key.key if self.select else "noise",
                "teachers": [self._teacher_fp[i] for i in cfg.recover_teachers],
                "ipc": cfg.ipc, "seed": cfg.seed, "data": self._data,
                "block_size": self.block_size, "version": __version__,
            }))
        self.images_stage: Stage = self.recover or self.select  # type: ignore[assignment]

        self.relabel = RelabelStage(self, StageKey("relabel", {
            "relabel": dataclasses.asdict(cfg.relabel),
            "images": self.images_stage.key.key,
            "teachers": [[self._teacher_fp[i], cfg.teachers[i].ensemble_weight]
                         for i in cfg.relabel_teachers],
            "seed": cfg.seed, "data": self._data, "version": __version__,
        }))
        self.evaluate = EvaluateStage(self, StageKey("evaluate", {
            "student": dataclasses.asdict(cfg.student),
            "relabel": self.relabel.key.key,
            "teachers": self._teacher_fp,
            "data": self._data, "max_val": d.max_val, "seed": cfg.seed, "version": __version__,
        }))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_weights"] = {}  # workers read the weights themselves (see __init__)
        return state

    def squeeze_skipped(self) -> list[dict]:
        """Unreadable training images that squeeze met (recorded in its meta.json)."""
        out = []
        for stage in self.squeeze.values():
            try:
                out += shards.read_json(storage.join(stage.dir, "meta.json")).get(
                    "skipped_inputs", [])
            except FileNotFoundError:
                pass
        return out

    def teacher_bytes(self, index: int) -> bytes | None:
        """The given weights of teacher ``index`` (read once per process, checked against
        its pin); None for a teacher without given weights."""
        t = self.cfg.teachers[index]
        if index not in self._weights and t.weights:
            from fadrm.models import read_pinned

            self._weights[index] = read_pinned(t.weights, t.sha256,
                                               f"teachers[{index}].weights")
        return self._weights.get(index)

    def block_classes(self, block: int) -> list[int]:
        start = block * self.block_size
        return list(range(start, min(start + self.block_size, self.num_classes)))

    def teacher_uri(self, index: int) -> str | None:
        t = self.cfg.teachers[index]
        if t.weights:
            return t.weights
        stage = self.squeeze.get(index)
        return stage.unit_uri("teacher") if stage else None

    def squeeze_stage(self, index: int) -> SqueezeStage | None:
        return self.squeeze.get(index)

    def teacher_sha256(self, index: int) -> str | None:
        """sha256 of the teacher's weights as recorded (given weights: hashed when planned;
        trained ones: their checksum sidecar), without reading the weights again."""
        fp = self._teacher_fp[index]
        if fp.startswith("sha256:"):
            return fp[len("sha256:"):]
        stage = self.squeeze.get(index)
        info = shards.shard_info(stage.unit_uri("teacher")) if stage else None
        return info["sha256"] if info else None

    @property
    def stages(self) -> list[Stage]:
        out: list[Stage] = list(self.squeeze.values())
        out += [s for s in (self.select, self.recover) if s is not None]
        return out + [self.relabel, self.evaluate]

    @property
    def run_dir(self) -> str:
        return storage.join(self.cfg.output, "runs", self.cfg.name)

    def fingerprints(self) -> dict[str, str]:
        from fadrm.lineage import digest

        return {
            "config": digest(config_to_dict(self.cfg), 12),
            "teachers": digest(self._teacher_fp, 12),
            "data": self.data_fp[:12],
        }

    # ----------------------------------------------------------------- status

    def previous_manifest(self) -> dict | None:
        try:
            return shards.read_json(storage.join(self.run_dir, "manifest.json"))
        except FileNotFoundError:
            return None

    def status(self) -> RunStatus:
        previous = (self.previous_manifest() or {}).get("stages", {})
        out = []
        for stage in self.stages:
            units = stage.units()
            complete = [u for u in units if stage.is_done(u)]
            done = len(complete)
            label = stage.label
            prev = previous.get(label)
            # Cheap (sizes against sidecars, no re-hashing): what `run` would repair first.
            damaged = [(stage.unit_uri(u), problem) for u in complete
                       if (problem := shards.check(stage.unit_uri(u), full=False))]
            if damaged:
                uri, problem = damaged[0]
                state, reason = "damaged", (f"{len(damaged)} damaged output(s), e.g. {uri}: "
                                            f"{problem}; `fadrm run` regenerates them")
            elif done == len(units):
                state, reason = "done", ""
            elif prev and prev["key"] != stage.key.key:
                state = "stale"
                changes = diff_components(prev["components"], stage.key.components)
                reason = "; ".join(changes) or "inputs changed"
            elif done:
                state, reason = "partial", f"{done} of {len(units)} units done"
            else:
                state, reason = "missing", "never run"
            out.append(StageStatus(label, stage.key.key, state, done, len(units), reason))
        return RunStatus(out, self.fingerprints())


# --------------------------------------------------------------------------- execution


class LocalExecutor:
    """Runs every unit in this process (tests, debugging)."""

    def __init__(self, device: str = "auto"):
        self.device = resolve_device(device)

    def run_stage(self, stage: Stage, pending: list[str], progress: "StageProgress") -> None:
        ctx = WorkerContext(device=self.device)
        state = stage.setup(ctx)
        for done, unit in enumerate(pending):
            ctx.report = lambda d, t, _done=done: progress.update(_done + (d / max(t, 1)))
            stage.run_unit(state, unit, ctx)
            progress.update(done + 1)


class StageProgress:
    """A driver-side progress bar over a stage's units (fractional while a unit runs)."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"{label:>10}", unit="unit", disable=not enabled,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} units "
                                   "[{elapsed}<{remaining}]", dynamic_ncols=True)
        self.total = total

    def update(self, done: float) -> None:
        done = min(float(done), self.total)
        if done > self.bar.n:
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
