"""The run plan: a :class:`RunConfig` turned into stages with their content keys.

Running them, with preflight and the report, is :mod:`fadrm.runner`'s. Which stages exist
between squeeze and relabel is the method's (:mod:`fadrm.methods`): a baseline without
selection or without pixel optimisation has no such stage.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fadrm import __version__, storage
from fadrm.formats import shards
from fadrm.config import RunConfig, StudentConfig, config_to_dict
from fadrm.lineage import RunStatus, StageKey, StageStatus, changed_values, digest, short
from fadrm.methods import create_method
from fadrm.stages import (EvaluateStage, RecoverStage, RelabelStage, SelectStage,
                          SqueezeStage, Stage)

__all__ = ["RunPlan", "RUN_ONLY_OPTIONS", "config_fingerprint", "report_dir", "latest_dir"]


class RunPlan:
    """The stages of one run, with their content keys."""

    def __init__(self, cfg: RunConfig, source: Any = None):
        from fadrm.datasource import DataSource

        self.cfg = cfg
        storage.use(storage.Storage.from_config(cfg.storage))
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

        self.method = create_method(cfg.recover.method)
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
                comp = {
                    "teacher": {"model": t.model, "small_stem": t.small_stem},
                    "squeeze": dataclasses.asdict(cfg.squeeze), "data": self._data,
                    "seed": cfg.seed, "index": i, "version": __version__,
                }
                comp.update(self._ranks())
                key = StageKey("squeeze", comp)
                self.squeeze[i] = SqueezeStage(self, key, i, cfg.squeeze)
                self._teacher_fp.append(f"squeeze:{key.key}")

    def _plan_stages(self) -> None:
        """select -> recover -> relabel -> evaluate, each keyed by what its output depends on
        (a baseline without selection or without pixel optimisation skips that stage)."""
        cfg, d = self.cfg, self.cfg.data
        method = self.method
        self.select: SelectStage | None = None
        if method.init is not None:
            comp = {"init": method.init, "ipc": cfg.ipc, "seed": cfg.seed, "data": self._data,
                    "block_size": self.block_size, "version": __version__}
            comp.update(method.select_key(cfg, self._teacher_fp))
            self.select = SelectStage(self, StageKey("select", comp), method, cfg.select)

        self.recover: RecoverStage | None = None
        if method.optimize:
            recover_cfg = dataclasses.asdict(cfg.recover)
            recover_cfg.pop("allow_no_bn")  # a permission, not an input: same bytes either way
            if recover_cfg["ipc_per_forward"] == 1:  # one index per forward: today's key
                recover_cfg.pop("ipc_per_forward")
            self.recover = RecoverStage(self, StageKey("recover", {
                "recover": recover_cfg,
                "init": self.select.key.key if self.select else "noise",
                "teachers": [self._teacher_fp[i] for i in cfg.recover_teachers],
                "ipc": cfg.ipc, "seed": cfg.seed, "data": self._data,
                "block_size": self.block_size, "version": __version__, **self._threads(),
                **self._precision(),
            }), method, cfg.recover)
        self.images_stage: Stage = self.recover or self.select  # type: ignore[assignment]

        relabel_cfg = dataclasses.asdict(cfg.relabel)
        if relabel_cfg["batches_per_forward"] == 1:  # today's labels: today's key
            relabel_cfg.pop("batches_per_forward")
        self.relabel = RelabelStage(self, StageKey("relabel", {
            "relabel": relabel_cfg,
            "images": self.images_stage.key.key,
            "teachers": [[self._teacher_fp[i], cfg.teachers[i].ensemble_weight]
                         for i in cfg.relabel_teachers],
            "seed": cfg.seed, "data": self._data, "version": __version__, **self._threads(),
            **self._precision(),
        }), cfg.relabel)
        student = dataclasses.asdict(cfg.student)
        if student["seeds"] is None:  # today's one student: today's keys
            del student["seeds"]
        if not cfg.student.data_parallel:  # the paper's step: lr rule and warm-up unused
            for name in STUDENT_STEP_FIELDS:
                del student[name]
        evaluate = {
            "student": student,
            "relabel": self.relabel.key.key,
            "teachers": self._teacher_fp,
            "data": self._data, "max_val": d.max_val, "seed": cfg.seed, "version": __version__,
        }
        if d.val_crop_ratio is not None:  # only when set: older configs keep their keys
            evaluate["val_crop_ratio"] = d.val_crop_ratio
        evaluate.update(self._ranks())
        evaluate.update(self._precision())
        self.evaluate = EvaluateStage(self, StageKey("evaluate", evaluate), cfg.student)

    def _ranks(self) -> dict:
        """What the training stages' (squeeze, evaluate) bytes depend on beyond their
        config: the number of DDP ranks (each rank's BatchNorm batch, the all-reduce). One
        rank (the default, and all the local executor does) adds nothing, so those keys
        are the ones of a single-process run."""
        n = self.cfg.execution.train_workers
        return {"train_workers": n, **self._threads()} if n > 1 else self._threads()

    def _threads(self) -> dict:
        """The torch intra-op threads a unit computes with (both executors pin them to
        ``execution.threads_per_worker``): CPU reductions split by thread, so squeeze,
        recover, relabel and evaluate bytes differ between 1 and 2 threads (measured;
        select's did not). One thread, the default, adds nothing to the keys."""
        n = self.cfg.execution.threads_per_worker
        return {"threads": n} if n != 1 else {}

    def _precision(self) -> dict:
        """The hot loops' autocast dtype (recover, relabel, the student): keyed only when
        not the default, so bf16 runs keep the keys they had before precision was a setting
        (the CPU's bytes of before too)."""
        precision = self.cfg.execution.precision
        return {"precision": precision} if precision != "bf16" else {}

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

    def weights_read(self, index: int) -> bytes | None:
        """The weights of teacher ``index`` if planning already read them (given weights
        whose metadata changed or were first seen), else None; reads nothing."""
        return self._weights.get(index)

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

    def report_state(self, manifest: dict | None) -> tuple[str, str]:
        """Whether ``manifest`` (this config's, or None) is a report of the current stage
        keys: ('current' | 'missing' | 'outdated', why)."""
        if manifest is None:
            return "missing", (f"no report of this config at {self.run_dir}/ (never written, "
                               f"or the run stopped before it was)")
        old = {k: (v or {}).get("key") for k, v in (manifest.get("stages") or {}).items()}
        new = {s.label: s.key.key for s in self.stages}
        if old != new:
            which = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            return "outdated", (f"the report at {self.run_dir}/ is of other stage keys "
                                f"({', '.join(which)})")
        return "current", ""

    def status(self, verify: bool = False) -> RunStatus:
        """Each stage for *this* config: done, partial, missing, damaged, or stale (its
        inputs differ from those of this config's last report, or when this config has none
        yet, of the newest report of the run name: the reason says which, and each change
        as ``key NEW here, OLD there``); and whether this config's report is current.

        ``verify``: read every byte of every complete output and check its sha256 (else
        only sizes are compared with the sidecars: a same-size corruption passes)."""
        own = self.previous_manifest()
        report, report_reason = self.report_state(own)
        against = own
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
            # Cheap by default (sizes against sidecars, no re-hashing): what `run` would
            # repair first; with ``verify`` every byte is read and hashed.
            damaged = [(stage.unit_uri(u), problem) for u in complete
                       if (problem := shards.check(stage.unit_uri(u), full=verify))]
            if damaged:
                uri, problem = damaged[0]
                done -= len(damaged)
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
        return RunStatus(out, self.fingerprints(), report, report_reason)


STUDENT_STEP_FIELDS = ("batches_per_step", "lr_scaling", "warmup_epochs")
"""The data-parallel student's settings: in the evaluate key only when it is on, in the
config fingerprint only when not at their defaults (earlier configs keep their folders)."""


RUN_ONLY_OPTIONS = ("address", "max_failures", "worker_start_timeout_s", "resource_wait_s",
                    "worker_group", "verify_outputs")
"""``execution`` options that decide how a run goes (which cluster, retries, waits, how
closely finished outputs are checked), never what it computes: the config fingerprint hashes
their defaults, so setting one (``--set execution.verify_outputs=true``) keeps the config's
report folder, and a config that leaves them at their defaults keeps the fingerprint it had.
Not here: what the bytes depend on (``device``, ``use_gpu``, ``threads_per_worker``,
``train_workers``), and ``min_workers``/``max_workers``, which change no bytes either but
which the presets set, so hashing their defaults would move those reports' folders."""


def config_fingerprint(cfg: RunConfig) -> str:
    """12 hex digits of the resolved config: each config's report has its own folder.
    The ``evaluate`` section counts only when it asks for scores (off, it changes nothing),
    ``student.seeds`` only when set, ``execution.precision`` only when not bf16 and
    ``relabel.batches_per_forward`` / ``recover.ipc_per_forward`` only when not 1, the
    :data:`STUDENT_STEP_FIELDS` only when not at their defaults (configs
    written before them keep their folders), and the :data:`RUN_ONLY_OPTIONS` as their
    defaults."""
    data = config_to_dict(cfg)
    if not cfg.evaluate.scores:
        data.pop("evaluate", None)
    if cfg.student.seeds is None:  # fields added later count only when set
        data["student"].pop("seeds", None)
    defaults = type(cfg.execution)()
    data["execution"].update({k: getattr(defaults, k) for k in RUN_ONLY_OPTIONS})
    if cfg.execution.precision == "bf16":
        data["execution"].pop("precision", None)
    if cfg.relabel.batches_per_forward == 1:
        data["relabel"].pop("batches_per_forward", None)
    if cfg.recover.ipc_per_forward == 1:
        data["recover"].pop("ipc_per_forward", None)
    defaults = StudentConfig()
    for name in STUDENT_STEP_FIELDS:
        if getattr(cfg.student, name) == getattr(defaults, name):
            data["student"].pop(name, None)
    return digest(data, 12)


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
