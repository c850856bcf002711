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
import datetime as dt
import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fadrm import __version__, storage
from fadrm.amp import resolve_device
from fadrm.config import RunConfig, config_to_dict
from fadrm.data import normalize
from fadrm.datasource import load_distilled
from fadrm.formats import shards
from fadrm.lineage import RunStatus, StageKey, StageStatus, changed_values, digest, short

log = logging.getLogger("fadrm.pipeline")

__all__ = ["WorkerContext", "Stage", "RunPlan", "LocalExecutor", "StageProgress", "unit_seed",
           "config_fingerprint", "report_dir", "latest_dir"]


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

    # The time this stage's output took to compute, kept beside it, so a later run that
    # reuses the output reports it as cached with its original time (not as 0 s).
    @property
    def timing_uri(self) -> str:
        return storage.join(self.dir, "timing.json")

    def recorded_seconds(self) -> float | None:
        """Seconds the runs that computed this output spent on it; None when unknown."""
        try:
            return shards.read_json(self.timing_uri)["seconds"]
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def record_seconds(self, seconds: float, units: int) -> None:
        """Add a run's ``seconds`` for ``units`` units (a resumed or repaired stage adds up)."""
        before = self.recorded_seconds() or 0.0
        shards.write_json(self.timing_uri, {
            "seconds": round(before + seconds, 2), "last_units": units,
            "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})

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
        # The plan reads the bytes once per process, so the next stage of a shared worker
        # group (recover, then relabel, then evaluate) loads from memory.
        digest = load_weights(model, uri, plan.teacher_bytes(index))  # returns their sha256
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
        d = self.cfg.data
        if d.kind == "imagefolder" and source.decoded_gib("train") > d.cache_gib:
            # Too large to hold decoded (data.cache_gib): stream it, batch by batch.
            return source.stream("train"), source.split("val")
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

        seed = unit_seed(cfg.seed, self.name, unit)
        torch.manual_seed(seed)
        model = create_model(
            cfg.student.model, self.plan.num_classes, in_chans=d.channels,
            image_size=d.resolution, small_stem=cfg.student.small_stem,
        ).to(ctx.device)
        result = train_student(
            model, images, labels_for_epoch, val, cfg.student, cfg.relabel.epochs,
            d.mean, d.std, self.plan.num_classes, ctx.device, seed=seed, progress=ctx.report,
            val_is_shard=ctx.world_size > 1,
        )
        # Every rank holds a share of the validation set: the counts are summed over ranks.
        teacher_top1 = [evaluate(_load_teacher(self.plan, i, ctx.device), val, d.mean, d.std,
                                 ctx.device, sharded=ctx.world_size > 1)[0]
                        for i in range(len(cfg.teachers))]
        if ctx.rank != 0:
            return
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
            "val_images": self.plan.source.count("val"),
            "skipped_inputs": self.plan.squeeze_skipped() + val.skipped,
        }
        shards.write_artifact(self.unit_uri(unit), _json_bytes(metrics))


def _select_key(cfg: RunConfig) -> dict:
    """The select settings that can change its bytes. Settings added later appear only
    where they matter, so the outputs of older configs stay valid: square patches
    (``crop_ratio`` [1, 1]) are what select always cut, and IDX images are stored at the
    resolution, so ``full_resolution`` changes nothing for them."""
    out = dataclasses.asdict(cfg.select)
    if [float(x) for x in out["crop_ratio"]] == [1.0, 1.0]:
        del out["crop_ratio"]
    if cfg.data.kind == "idx":
        del out["full_resolution"]
    return out


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
                # Object-store metadata (ETag / size / mtime) decides whether the bytes must
                # be read and hashed again; an unchanged checkpoint is not downloaded.
                from fadrm.fingerprints import cache_dir_for, weights_fingerprint

                fp = weights_fingerprint(t.weights, pin=t.sha256, key=f"teachers[{i}].weights",
                                         cache_dir=cache_dir_for(cfg.output))
                if fp.data is not None:  # read (changed or first seen): keep, no second read
                    self._weights[i] = fp.data
                self._teacher_fp.append("sha256:" + fp.sha256)
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
                comp["select"] = _select_key(cfg)
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
        evaluate = {
            "student": dataclasses.asdict(cfg.student),
            "relabel": self.relabel.key.key,
            "teachers": self._teacher_fp,
            "data": self._data, "max_val": d.max_val, "seed": cfg.seed, "version": __version__,
        }
        if d.val_crop_ratio is not None:  # only when set: older configs keep their keys
            evaluate["val_crop_ratio"] = d.val_crop_ratio
        self.evaluate = EvaluateStage(self, StageKey("evaluate", evaluate))

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
        """The weights of teacher ``index``, read once per process: given weights (checked
        against their pin), or the ones squeeze trained (once that stage has run); None
        for a teacher with neither (named pretrained weights)."""
        t = self.cfg.teachers[index]
        if index not in self._weights:
            if t.weights:
                from fadrm.models import read_pinned

                self._weights[index] = read_pinned(t.weights, t.sha256,
                                                   f"teachers[{index}].weights")
            elif (uri := self.teacher_uri(index)) is not None:
                self._weights[index] = storage.read_bytes(uri)
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
        """This config's report: ``<output>/runs/<name>/<config fingerprint>/``."""
        return report_dir(self.cfg)

    @property
    def latest_dir(self) -> str:
        """``<output>/runs/<name>/latest``: the newest report of this run name."""
        return latest_dir(self.cfg)

    def fingerprints(self) -> dict[str, str]:
        return {
            "config": config_fingerprint(self.cfg),
            "teachers": digest(self._teacher_fp, 12),
            "data": self.data_fp[:12],
        }

    # ----------------------------------------------------------------- status

    def previous_manifest(self) -> dict | None:
        """The manifest of this config's report (None when this config never finished)."""
        return _read_manifest(self.run_dir)

    def latest_manifest(self) -> dict | None:
        """The manifest of the newest report of this run name, whatever its config (a
        report of an earlier build, directly under runs/<name>/, counts too)."""
        return _read_manifest(self.latest_dir) or _read_manifest(
            storage.join(self.cfg.output, "runs", self.cfg.name))

    def status(self) -> RunStatus:
        """Each stage for *this* config: done, partial, missing, damaged, or stale (its
        inputs differ from those of this config's last report, or when this config has none
        yet, of the newest report of the run name: the reason says which, and each change
        as ``key NEW here, OLD there``)."""
        against = self.previous_manifest()
        basis = "this config's last run"
        if against is None:
            against = self.latest_manifest()
            fp = ((against or {}).get("fingerprints") or {}).get("config", "?")
            basis = f"the latest run (another config, {fp})"
        previous = (against or {}).get("stages", {})
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
                changes = changed_values(prev["components"], stage.key.components)
                what = "; ".join(f"{path} {short(new)} here, {short(old)} there"
                                 for path, old, new in changes)
                reason = f"differs from {basis}: {what or 'inputs changed'}"
            elif done:
                state, reason = "partial", f"{done} of {len(units)} units done"
            else:
                state, reason = "missing", "never run"
            out.append(StageStatus(label, stage.key.key, state, done, len(units), reason))
        return RunStatus(out, self.fingerprints())


def config_fingerprint(cfg: RunConfig) -> str:
    """12 hex digits of the resolved config: each config's report has its own folder."""
    return digest(config_to_dict(cfg), 12)


def report_dir(cfg: RunConfig) -> str:
    """Where ``cfg``'s report lives: ``<output>/runs/<name>/<config fingerprint>``."""
    return storage.join(cfg.output, "runs", cfg.name, config_fingerprint(cfg))


def latest_dir(cfg: RunConfig) -> str:
    """``<output>/runs/<name>/latest``: the newest report of the run name (a symlink to its
    folder on local storage, a copy on object storage)."""
    return storage.join(cfg.output, "runs", cfg.name, "latest")


def _read_manifest(run_dir: str) -> dict | None:
    try:
        return shards.read_json(storage.join(run_dir, "manifest.json"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


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
    """Driver-side progress of a stage: whole units done, percent (fractions inside units
    count), time elapsed and left.

    On a terminal: one tqdm bar, drawn from the first update on (so what an executor prints
    while it starts, such as Ray's token-authentication notice, comes before the bar, not
    through it); while it is drawn, log records go through tqdm (each on its own line, the
    bar redrawn below them).
    Elsewhere (a pod's log, CI, a pipe): one plain line every ``line_step`` percent instead
    of a redraw every second. The time left is estimated from progress since the first
    report, so a long start-up (workers, data, teachers) does not inflate it, and it is
    shown only once there is enough progress to estimate it.
    """

    line_step = 5  # percent
    _min_progress = 0.02  # of the stage, before a time-left estimate is shown
    _min_seconds = 1.0

    def __init__(self, label: str, total: int, enabled: bool = True, file=None,
                 tty: bool | None = None, clock=time.monotonic):
        self.label, self.total, self.enabled = label, max(int(total), 1), enabled
        self._file, self._tty, self._clock = file, tty, clock
        self.start = clock()
        self.done = 0.0
        self._first: tuple[float, float] | None = None  # (time, fraction) of first progress
        self._bar = None
        self._redirect = None
        self._drawn = 0.0
        self._next_line = 0.0  # percent at which the next plain line is due

    @property
    def file(self):
        return self._file if self._file is not None else sys.stderr

    @property
    def tty(self) -> bool:
        if self._tty is None:
            isatty = getattr(self.file, "isatty", None)
            self._tty = bool(isatty and isatty())
        return self._tty

    def update(self, done: float) -> None:
        """``done``: units finished, with the running units' fractions."""
        if not self.enabled:
            return
        done = min(float(done), self.total)
        now = self._clock()
        if done < self.done or (done == self.done and self._first is not None):
            if self.tty and self._bar is not None and now - self._drawn >= 1.0:
                self._draw(now)  # no progress: the elapsed time still moves
            return
        if self._first is None or (self._first[1] == 0 and done > 0):
            self._first = (now, done / self.total)
        self.done = done
        if self.tty:
            self._draw(now)
        else:
            self._line(now)

    def seconds_left(self, now: float | None = None) -> float | None:
        now = self._clock() if now is None else now
        fraction = self.done / self.total
        if fraction >= 1:
            return 0.0
        if self._first is None:
            return None
        t0, f0 = self._first
        if fraction - f0 < self._min_progress or now - t0 < self._min_seconds:
            return None
        return (now - t0) * (1 - fraction) / (fraction - f0)

    def text(self, now: float | None = None) -> str:
        """``3/10 units, 0:42 elapsed, ~1:10 left``."""
        now = self._clock() if now is None else now
        left = self.seconds_left(now)
        units = int(self.done + 1e-9)  # whole units: a running unit's fraction is in the %
        out = f"{units}/{self.total} units, {_clock_text(now - self.start)} elapsed"
        if left is not None and self.done < self.total:
            out += f", ~{_clock_text(left)} left"
        return out

    def _draw(self, now: float) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            try:  # a terminal that reports no size (0 columns) gets a fixed width
                sized = os.get_terminal_size(self.file.fileno()).columns > 0
            except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                sized = False
            # The root logger's console output, and Ray's (its own handler, once Ray runs).
            ray_log = logging.getLogger("ray")
            console = [lg for lg in (logging.root, ray_log) if lg is logging.root or any(
                type(h) is logging.StreamHandler for h in lg.handlers)]
            self._redirect = logging_redirect_tqdm(loggers=console, tqdm_class=tqdm)
            self._redirect.__enter__()
            self._bar = tqdm(total=1000, desc=f"{self.label:>10}", file=self.file,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix[0]}",
                             postfix=[""], dynamic_ncols=sized, ncols=None if sized else 100,
                             nrows=None if sized else 20)
        if self.done < self.total and now - self._drawn < 0.1:
            return  # at most ten redraws a second
        self._drawn = now
        self._bar.n = int(1000 * self.done / self.total + 1e-9)
        self._bar.postfix = [self.text(now)]  # a list: tqdm prints it as is (no ", ")
        self._bar.refresh()

    def _line(self, now: float) -> None:
        percent = 100 * self.done / self.total
        if percent < self._next_line and self.done < self.total:
            return
        print(f"{self.label}: {int(percent):3d}% ({self.text(now)})", file=self.file,
              flush=True)
        self._next_line = (percent // self.line_step + 1) * self.line_step
        if self.done >= self.total:
            self._next_line = float("inf")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def _clock_text(seconds: float) -> str:
    seconds = int(max(seconds, 0) + 0.5)
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours
            else f"{rest // 60}:{rest % 60:02d}")
