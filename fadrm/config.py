"""One YAML file -> typed, validated run configuration.

Every stage owns a ``@dataclass(kw_only=True)`` section. ``load_config`` parses YAML,
applies ``--set key.path=value`` overrides, rejects unknown keys and wrong types, and
validates values, always raising :class:`ConfigError` with the offending key path
(``recover.alpha: must be in [0, 1], got 1.5``) before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fadrm.errors import InputError
from fadrm.methods.registry import Method, create_method, is_method, list_methods

__all__ = [
    "ConfigError",
    "DataConfig",
    "TeacherConfig",
    "SqueezeConfig",
    "SelectConfig",
    "RecoverConfig",
    "RelabelConfig",
    "StudentConfig",
    "ExecutionConfig",
    "StorageConfig",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "list_presets",
    "preset_path",
    "preset_purpose",
    "resolve_config",
]


class ConfigError(InputError):
    """A configuration problem; the message starts with the key path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


# --------------------------------------------------------------------------- sections


@dataclass(kw_only=True)
class DataConfig:
    """Real data: where it is, how it is decoded and normalised."""

    kind: str = "imagefolder"
    """'imagefolder' (class-per-folder JPEG/PNG tree) or 'idx' (MNIST-style IDX files)."""
    root: str = ""
    """ImageFolder root, or the directory holding the IDX files (.gz or raw)."""
    val_root: str | None = None
    """Optional separate validation ImageFolder. IDX data uses its t10k files."""
    val_per_class: int = 0
    """When there is no validation split: hold out this many training images per class."""
    resolution: int = 32
    """Side length in pixels that images are resized to."""
    channels: int = 3
    """1 (grayscale) or 3 (RGB); images are converted on load."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    max_train_per_class: int | None = None
    """Use at most this many training images per class (small tests, quick runs)."""
    max_val: int | None = None
    """Evaluate on at most this many validation images (deterministic subset)."""
    split_seed: int = 0
    """Seed of the train/validation hold-out split and of subsetting."""
    cache_gib: float = 8.0
    """Squeeze holds a decoded ImageFolder training set in memory when it needs at most this
    many GiB (uint8 at the resolution); a larger one streams from storage through torch
    DataLoader workers (same batches, same result). IDX data is always held in memory."""
    val_crop_ratio: float | None = None
    """Validation images (evaluate, and the teachers' validation in squeeze): None -> the
    same centre square as training images; r in (0, 1] -> shorter side resized to
    round(resolution / r), then a centre crop of resolution (torchvision's ImageNet
    evaluation transform, Resize(256) + CenterCrop(224) for r = 0.875)."""
    fingerprint: str = "listing"
    """How an ImageFolder's files enter the data fingerprint (and so every stage's key):
    'listing' -> path, size and modification time of each file (no reads; a copied tree
    with new mtimes counts as new data and retrains its teachers); 'content' -> path and
    sha256 of each file's bytes (reads every file once per run: a copied or re-downloaded
    tree with the same bytes reuses completed work). IDX files are always hashed."""

    def validate(self, p: str) -> None:
        if self.kind not in ("imagefolder", "idx"):
            raise ConfigError(f"{p}.kind", f"must be 'imagefolder' or 'idx', got {self.kind!r}")
        if not self.root:
            raise ConfigError(f"{p}.root", "is required (path to the training data)")
        _positive(self.resolution, f"{p}.resolution")
        if self.channels not in (1, 3):
            raise ConfigError(f"{p}.channels", f"must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            vals = getattr(self, name)
            if len(vals) != self.channels:
                raise ConfigError(
                    f"{p}.{name}",
                    f"needs {self.channels} values (one per channel), got {len(vals)}",
                )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"{p}.std", "values must be > 0")
        if self.val_per_class < 0:
            raise ConfigError(f"{p}.val_per_class", "must be >= 0")
        if self.max_train_per_class is not None:
            _positive(self.max_train_per_class, f"{p}.max_train_per_class")
        if self.max_val is not None:
            _positive(self.max_val, f"{p}.max_val")
        if self.cache_gib < 0:
            raise ConfigError(f"{p}.cache_gib", f"must be >= 0, got {self.cache_gib}")
        if self.val_crop_ratio is not None and not 0 < self.val_crop_ratio <= 1:
            raise ConfigError(f"{p}.val_crop_ratio",
                              f"must be in (0, 1] (or null), got {self.val_crop_ratio}")
        if self.fingerprint not in ("listing", "content"):
            raise ConfigError(f"{p}.fingerprint",
                              f"must be 'listing' or 'content', got {self.fingerprint!r}")


@dataclass(kw_only=True)
class TeacherConfig:
    """One teacher network."""

    model: str = "resnet18"
    """torchvision or timm model name, or a built-in name such as 'convnet'."""
    weights: str | None = None
    """Path, s3:// or https:// URI of a state_dict; None -> trained by the squeeze stage."""
    sha256: str | None = None
    """sha256 of the weights file: required for https:// weights (the pin is the teacher's
    fingerprint, and downloads are checked against it), checked when given for others."""
    pretrained: bool = False
    """Load the library's named pretrained weights from the local torch / Hugging Face
    cache (runs never download them; preflight says which file to fetch); the file's own
    sha256 is the teacher's fingerprint."""
    small_stem: bool | None = None
    """3x3 stride-1 stem without max-pool; None -> automatic for inputs <= 64 px."""
    ensemble_weight: float = 0.0
    """Relabel ensemble weight w: logits are averaged with softmax(w / 10)."""
    recover: bool = True
    """Use this teacher in recover (FADRM+ uses all such teachers round-robin)."""
    relabel: bool = True
    """Use this teacher in relabel's ensemble."""

    def validate(self, p: str) -> None:
        if not self.model:
            raise ConfigError(f"{p}.model", "is required")
        if self.weights and self.pretrained:
            raise ConfigError(f"{p}.pretrained", "cannot be combined with weights")
        if self.sha256 is not None and not _SHA256.fullmatch(self.sha256):
            raise ConfigError(f"{p}.sha256", f"must be 64 hex digits, got {self.sha256!r}")
        if self.weights and self.weights.split("://")[0] in ("http", "https") \
                and not self.sha256:
            raise ConfigError(f"{p}.sha256", f"is required for weights from {self.weights} "
                              f"(a URL can change under the same name): pin the file's "
                              f"sha256, e.g. from `sha256sum FILE`")
        if self.sha256 and not self.weights:
            raise ConfigError(f"{p}.sha256", "pins a weights file: set weights too")


@dataclass(kw_only=True)
class SqueezeConfig:
    """Teacher training on the real data (only for teachers without weights)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    mixed_precision: bool = True

    def validate(self, p: str) -> None:
        _positive(self.epochs, f"{p}.epochs")
        _positive(self.batch_size, f"{p}.batch_size")
        _positive(self.lr, f"{p}.lr")
        _unit_interval(self.label_smoothing, f"{p}.label_smoothing")


@dataclass(kw_only=True)
class SelectConfig:
    """Realism-scored patch selection (initial images P)."""

    num_candidates: int = 300
    """m: random real images drawn per class."""
    num_crops: int = 5
    """c: square patches cropped from each candidate image."""
    factor: int = 1
    """Patches per side stitched into one image (1 or 2)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range of the candidate patches (fraction of the image)."""
    crop_ratio: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """RandomResizedCrop aspect-ratio range (width / height, drawn log-uniformly as
    torchvision does); [1, 1] = square patches, as RDED (ratio=(1, 1)); [0.75, 1.3333]
    = torchvision's default. A non-square box is resized to a square patch."""
    full_resolution: bool = True
    """ImageFolder data: cut the patches from each candidate at its stored size (JPEGs
    DCT-downscaled only while the shorter side stays >= data.resolution), as the authors'
    RandomResizedCrop on the original image; false -> from the centre square at
    data.resolution that training images are decoded to. Same bytes either way for IDX
    data and for images stored as resolution x resolution squares."""
    batch_size: int = 256
    teacher: int = 0
    """Index into `teachers` of the observer that scores realism."""

    def validate(self, p: str) -> None:
        _positive(self.num_candidates, f"{p}.num_candidates")
        _positive(self.num_crops, f"{p}.num_crops")
        if self.factor not in (1, 2):
            raise ConfigError(f"{p}.factor", f"must be 1 or 2, got {self.factor}")
        _scale_range(self.crop_scale, f"{p}.crop_scale")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ConfigError(f"{p}.crop_ratio",
                              f"must be [low, high] with 0 < low <= high, got {self.crop_ratio}")
        _positive(self.batch_size, f"{p}.batch_size")


@dataclass(kw_only=True)
class RecoverConfig:
    """Data residual matching (pixel optimisation)."""

    method: str = "fadrm"
    """A registered method (:mod:`fadrm.methods`): random-real, rded, sre2l, fadrm, fadrm+."""
    resolutions: list[int] = field(default_factory=lambda: [32, 32, 32, 32])
    """MRO: resolution of each stage (k+1 stages)."""
    stage_iterations: list[int] = field(default_factory=lambda: [500, 500, 500, 500])
    """MRO: iterations of each stage; one cosine schedule spans their sum."""
    lr: float = 0.25
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    r_bn: float = 0.01
    """Weight of the BN-statistics loss."""
    first_bn_multiplier: float = 10.0
    """m_1: extra weight of the first BatchNorm layer's statistics."""
    alpha: float = 0.5
    """ARC: x <- alpha * x + (1 - alpha) * resample(P) at inner stage boundaries."""
    jitter: int = 4
    """Maximum cyclic shift in pixels."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    flip: bool = True
    class_block_size: int = 0
    """Classes per work unit / batch (one image per class); 0 -> all classes."""
    allow_no_bn: bool = False
    """Allow a recover teacher without BatchNorm running statistics for the BN-matching
    methods (sre2l, fadrm, fadrm+): its BN term is 0, so recover optimises cross-entropy
    only (not FADRM). Off: such a teacher is an error before any stage runs."""
    channels_last: bool = True
    """Run the teachers in the channels_last memory layout (faster convolutions and
    batch-norm statistics; the loss is the same up to float rounding)."""
    compile: bool = False
    """torch.compile the teachers' forward (off: on a 2-core CPU compiling costs minutes
    and did not pay for itself, see benchmarks/README.md)."""

    @property
    def spec(self) -> Method:
        """The registered method object (:func:`fadrm.methods.create_method`)."""
        return create_method(self.method)

    @property
    def total_iterations(self) -> int:
        return sum(self.stage_iterations)

    def validate(self, p: str) -> None:
        if not is_method(self.method):
            raise ConfigError(
                f"{p}.method", f"unknown method {self.method!r}; choose from "
                f"{sorted(list_methods())}"
            )
        if len(self.resolutions) != len(self.stage_iterations):
            raise ConfigError(
                f"{p}.stage_iterations",
                f"has {len(self.stage_iterations)} entries but {p}.resolutions has "
                f"{len(self.resolutions)}; MRO needs one budget per resolution",
            )
        if not self.resolutions:
            raise ConfigError(f"{p}.resolutions", "needs at least one stage")
        for i, r in enumerate(self.resolutions):
            _positive(r, f"{p}.resolutions[{i}]")
        for i, n in enumerate(self.stage_iterations):
            if n < 0:
                raise ConfigError(f"{p}.stage_iterations[{i}]", f"must be >= 0, got {n}")
        _positive(self.lr, f"{p}.lr")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{p}.betas", f"must be two values in [0, 1), got {self.betas}")
        if self.r_bn < 0:
            raise ConfigError(f"{p}.r_bn", "must be >= 0")
        _unit_interval(self.alpha, f"{p}.alpha")
        if self.jitter < 0:
            raise ConfigError(f"{p}.jitter", "must be >= 0")
        _scale_range(self.crop_scale, f"{p}.crop_scale")
        if self.class_block_size < 0:
            raise ConfigError(f"{p}.class_block_size", "must be >= 0")


@dataclass(kw_only=True)
class RelabelConfig:
    """FKD-style soft labels: per-epoch views + teacher-ensemble logits."""

    epochs: int = 300
    """E: one set of views per student epoch."""
    batch_size: int = 100
    """Images per view batch (CutMix mixes within a batch); the student uses the same."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    flip: bool = True
    cutmix: bool = True
    cutmix_beta: float = 1.0
    teacher_bn_mode: str = "train"
    """'train' (batch statistics, as the reference) or 'eval' (running statistics)."""
    bn_splits: int = 2
    """With teacher_bn_mode 'train': each stored batch is labelled in this many contiguous
    parts, whose size is the teachers' BN batch (the reference: 2 halves, e.g. 16 -> 2 x 8).
    1 labels the whole batch at once. No effect in 'eval' mode."""
    top_k: int = 0
    """Store only the k largest logits (plus the mean of the rest); 0 -> all logits."""
    label_mode: str = "soft"
    """'soft': teacher-ensemble logits (FKD). 'hard': no teacher; each view is labelled
    with its image's class (CutMix views: lam * own class + (1 - lam) * partner's class)
    and the student trains with cross-entropy on those targets (the hard-label baseline)."""
    epochs_per_shard: int = 50
    """Work unit size: epochs per soft-label shard (relabel units = epochs / this; the
    labels do not depend on it, only how many workers relabel can use)."""

    def validate(self, p: str) -> None:
        _positive(self.epochs, f"{p}.epochs")
        _positive(self.batch_size, f"{p}.batch_size")
        _scale_range(self.crop_scale, f"{p}.crop_scale")
        _positive(self.cutmix_beta, f"{p}.cutmix_beta")
        if self.teacher_bn_mode not in ("train", "eval"):
            raise ConfigError(f"{p}.teacher_bn_mode", "must be 'train' or 'eval'")
        _positive(self.bn_splits, f"{p}.bn_splits")
        if self.top_k < 0:
            raise ConfigError(f"{p}.top_k", "must be >= 0 (0 keeps all logits)")
        if self.label_mode not in ("soft", "hard"):
            raise ConfigError(f"{p}.label_mode", f"must be 'soft' or 'hard', got "
                              f"{self.label_mode!r}")
        if self.label_mode == "hard" and self.top_k:
            raise ConfigError(f"{p}.top_k", "applies to soft labels only; use 0 with "
                              "label_mode 'hard'")
        _positive(self.epochs_per_shard, f"{p}.epochs_per_shard")


@dataclass(kw_only=True)
class StudentConfig:
    """Student trained only on the distilled images and their stored soft labels."""

    model: str = "resnet18"
    small_stem: bool | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 20.0
    eta: float = 2.0
    """Cosine schedule 0.5 * (1 + cos(pi * epoch / (epochs * eta)))."""
    accumulation_steps: int = 2
    """Micro-batches per stored relabel batch (one optimiser step per stored batch; the
    micro-batch is the BatchNorm batch and the unit data-parallel ranks share out)."""
    eval_every: int = 0
    """Evaluate every N epochs (0 -> only at the end); the best epoch is reported too."""
    eval_batch_size: int = 512
    mixed_precision: bool = True

    def validate(self, p: str) -> None:
        _positive(self.lr, f"{p}.lr")
        if self.weight_decay < 0:
            raise ConfigError(f"{p}.weight_decay", "must be >= 0")
        _positive(self.temperature, f"{p}.temperature")
        _positive(self.eta, f"{p}.eta")
        _positive(self.accumulation_steps, f"{p}.accumulation_steps")
        if self.eval_every < 0:
            raise ConfigError(f"{p}.eval_every", "must be >= 0")
        _positive(self.eval_batch_size, f"{p}.eval_batch_size")


@dataclass(kw_only=True)
class ExecutionConfig:
    """Where and how the stages run."""

    address: str | None = None
    """Ray address; None -> start an embedded local Ray instance."""
    min_workers: int = 1
    max_workers: int = 2
    """Ray Train worker range (elastic): ScalingConfig(num_workers=(min, max))."""
    use_gpu: bool | None = None
    """None -> use GPUs when the cluster has them."""
    threads_per_worker: int = 1
    """torch intra-op threads (and CPUs reserved) per worker."""
    max_failures: int = 3
    """Ray Train FailureConfig(max_failures=...)."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda' for in-process work."""
    worker_start_timeout_s: float | None = None
    """Seconds Ray Train waits for a worker group before retrying smaller (elastic); None ->
    Ray's default (60). Lower it to recover faster from a node loss on a fixed cluster;
    keep it above your autoscaler's node start time."""
    resource_wait_s: float | None = 1800.0
    """Seconds a stage may wait for its first worker group (workers or GPUs the cluster
    does not have yet; the driver says once a minute what it waits for) before the run
    fails; None -> wait forever. Keep it above your autoscaler's GPU node start time."""
    worker_group: str = "shared"
    """'shared': one Ray Train worker group runs every stage that has work, one after the
    other (workers start once; teachers stay loaded between the stages that use them);
    'per_stage': a new worker group for each stage (each stage's own retries and size)."""
    verify_outputs: bool = False
    """Before a run, every complete output is checked against its sidecar: size always,
    sha256 of every byte only when true (slow at scale). Either way each shard's sha256 is
    verified when a stage reads it, so a damaged shard is never used; damaged outputs are
    discarded and regenerated."""

    def validate(self, p: str) -> None:
        _positive(self.min_workers, f"{p}.min_workers")
        if self.max_workers < self.min_workers:
            raise ConfigError(
                f"{p}.max_workers",
                f"must be >= min_workers ({self.min_workers}), got {self.max_workers}",
            )
        _positive(self.threads_per_worker, f"{p}.threads_per_worker")
        if self.max_failures < -1:
            raise ConfigError(f"{p}.max_failures", "must be >= -1 (-1 = retry forever)")
        if self.worker_start_timeout_s is not None:
            _positive(self.worker_start_timeout_s, f"{p}.worker_start_timeout_s")
        if self.resource_wait_s is not None:
            _positive(self.resource_wait_s, f"{p}.resource_wait_s")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{p}.device", "must be 'auto', 'cpu' or 'cuda'")
        if self.worker_group not in ("shared", "per_stage"):
            raise ConfigError(f"{p}.worker_group",
                              f"must be 'shared' or 'per_stage', got {self.worker_group!r}")


@dataclass(kw_only=True)
class StorageConfig:
    """Object storage settings for s3:// paths (credentials come from the environment)."""

    endpoint_url: str | None = None
    """S3 API endpoint, e.g. http://minio.minio:9000; None -> AWS_ENDPOINT_URL(_S3) or AWS."""
    region: str | None = None
    """None -> AWS_REGION / AWS_DEFAULT_REGION."""

    def validate(self, p: str) -> None:
        if self.endpoint_url and "://" not in self.endpoint_url:
            raise ConfigError(f"{p}.endpoint_url",
                              f"must be a URL such as http://host:9000, got {self.endpoint_url!r}")


@dataclass(kw_only=True)
class RunConfig:
    """A whole distillation run."""

    name: str = "run"
    """Run name: the run's report lives under <output>/runs/<name>/."""
    output: str = "runs/out"
    """Output root (local path; s3:// arrives with cluster execution)."""
    seed: int = 0
    ipc: int = 10
    """Distilled images per class."""
    data: DataConfig = field(default_factory=DataConfig)
    teachers: list[TeacherConfig] = field(default_factory=lambda: [TeacherConfig()])
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    # Not a field (never in config.yaml or a stage key): key paths of the local paths that
    # were given relative to the working directory, set by config_from_dict.
    relative_paths: typing.ClassVar[list[str]] = []

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError("name", f"must be a non-empty name without '/', got {self.name!r}")
        if not self.output:
            raise ConfigError("output", "is required")
        _positive(self.ipc, "ipc")
        self.data.validate("data")
        if not self.teachers:
            raise ConfigError("teachers", "needs at least one teacher")
        for i, t in enumerate(self.teachers):
            t.validate(f"teachers[{i}]")
        if not any(t.recover for t in self.teachers):
            raise ConfigError("teachers", "at least one teacher needs recover: true")
        if not any(t.relabel for t in self.teachers):
            raise ConfigError("teachers", "at least one teacher needs relabel: true")
        self.squeeze.validate("squeeze")
        self.select.validate("select")
        if self.select.teacher >= len(self.teachers) or self.select.teacher < 0:
            raise ConfigError(
                "select.teacher", f"index {self.select.teacher} but there are "
                f"{len(self.teachers)} teachers",
            )
        self.recover.validate("recover")
        self.relabel.validate("relabel")
        self.student.validate("student")
        self.execution.validate("execution")
        self.storage.validate("storage")

    @property
    def recover_teachers(self) -> list[int]:
        """Indices of the teachers recover uses (only the first unless FADRM+)."""
        idx = [i for i, t in enumerate(self.teachers) if t.recover]
        return idx if self.recover.spec.multi_teacher else idx[:1]

    @property
    def relabel_teachers(self) -> list[int]:
        return [i for i, t in enumerate(self.teachers) if t.relabel]


# --------------------------------------------------------------------------- helpers

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _positive(value: float, path: str) -> None:
    if not value > 0:
        raise ConfigError(path, f"must be > 0, got {value}")


def _unit_interval(value: float, path: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(path, f"must be in [0, 1], got {value}")


def _scale_range(value: list[float], path: str) -> None:
    if len(value) != 2 or not 0 < value[0] <= value[1] <= 1:
        raise ConfigError(path, f"must be [low, high] with 0 < low <= high <= 1, got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, "must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, path)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, f"must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"must be a string, got {value!r}")
    raise ConfigError(path, f"unsupported type {_type_name(tp)}")


# Keys people look for in the wrong place: where the setting lives instead.
_LIVES_ELSEWHERE = {
    "student.epochs": "the student trains for relabel.epochs epochs (one stored set of "
                      "views and soft labels per epoch): set relabel.epochs",
    "student.batch_size": "the student trains on the stored relabel batches: set "
                          "relabel.batch_size (student.accumulation_steps splits each into "
                          "micro-batches)",
    "recover.iterations": "set recover.stage_iterations (one budget per MRO stage, e.g. "
                          "[500, 500, 500, 500])",
    "recover.ipc": "ipc is a top-level key: set ipc",
    "squeeze.model": "each teacher names its model: set teachers[0].model",
    "evaluate": "the student's settings are the student section (student.lr, ...); its "
                "epochs are relabel.epochs",
}


def _build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            generic = re.sub(r"\[\d+\]", "[0]", key_path)
            if generic in _LIVES_ELSEWHERE:
                raise ConfigError(key_path, f"unknown key: {_LIVES_ELSEWHERE[generic]}")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key_path, f"unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], key_path)
    return cls(**kwargs)


def config_from_dict(data: dict) -> RunConfig:
    """Build and validate a RunConfig from plain data (as parsed from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError("", f"a run config must be a mapping, got {type(data).__name__}")
    cfg = _build(RunConfig, data, "")
    cfg.validate()
    _check_model_names(cfg)
    cfg.relative_paths = _absolute_paths(cfg)
    return cfg


def _check_model_names(cfg: RunConfig) -> None:
    """Every teacher and the student name a model some source has (did-you-mean if not)."""
    from fadrm.models import ModelNameError, check_model_name

    named = [(f"teachers[{i}].model", t.model) for i, t in enumerate(cfg.teachers)]
    for path, name in [*named, ("student.model", cfg.student.model)]:
        try:
            check_model_name(name)
        except ModelNameError as exc:
            raise ConfigError(path, str(exc)) from None


def _absolute(path: str | None) -> str | None:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().absolute())


def _absolute_paths(cfg: RunConfig) -> list[str]:
    """Resolve relative local paths against the working directory; returns the key paths
    of those that were relative (a submitted job's working directory is a temporary copy,
    so such a config must not be submitted: see fadrm.preflight)."""
    # Ray workers run in their own working directories: a relative local path must mean
    # the same file on the driver and on every worker, so resolve it here, once.
    relative = []

    def resolve(path: str | None, key: str) -> str | None:
        absolute = _absolute(path)
        if absolute != path and path and not Path(path).expanduser().is_absolute():
            relative.append(key)
        return absolute

    cfg.output = resolve(cfg.output, "output")
    cfg.data.root = resolve(cfg.data.root, "data.root")
    cfg.data.val_root = resolve(cfg.data.val_root, "data.val_root")
    for i, t in enumerate(cfg.teachers):
        t.weights = resolve(t.weights, f"teachers[{i}].weights")
    return relative


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what is written beside the outputs)."""
    return dataclasses.asdict(cfg)


def _key_parts(key: str) -> list[str]:
    """``teachers[0].model`` or ``teachers.0.model`` -> ['teachers', '0', 'model']."""
    return re.sub(r"\[([^\]]*)\]", r".\1", key).split(".")


def _key_path(parts: list[str]) -> str:
    """The key path as errors write it: ``teachers[0].model``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() and out else (f".{part}" if out else part)
    return out


def _set_path(data: dict, dotted: str, value: Any) -> None:
    """Apply one override ``a.b.0.c=value`` (or ``a.b[0].c=value``) to nested plain data.

    A list index may also be the list's length: that appends an item (``teachers.1.model=
    resnet18`` adds a second teacher to a one-teacher config).
    """
    parts = _key_parts(dotted)
    if not all(parts):
        raise ConfigError(dotted, "empty key in the path (write key.path=value; list items "
                          "as teachers.0.model or 'teachers[0].model')")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = _key_path(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                valid = f"0 to {len(node) - 1}, or {len(node)} to append" if node else "0"
                raise ConfigError(where, f"list index out of range: the list has "
                                  f"{len(node)} item(s); use an index {valid}, e.g. "
                                  f"teachers.0.model=... or 'teachers[0].model=...'")
            if int(part) == len(node):
                node.append(value if last else {})
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(where, "cannot set a key inside a scalar value")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line: what is wrong and where (line, column from 1)."""
    what = "; ".join(str(p) for p in (getattr(exc, "context", None),
                                      getattr(exc, "problem", None)) if p) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(what.split()) + where


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(key.strip(), f"--set {item!r}: the value is not valid YAML: "
                              f"{_yaml_problem(exc)} (lists: [32, 32]; quote a string "
                              f"holding [ ] {{ }} : or #)") from None
        _set_path(data, key.strip(), value)
    return data


def _with_teacher_defaults(data: dict) -> dict:
    # Teacher entries may be plain model names for brevity: ["resnet18", "convnet"].
    if isinstance(data.get("teachers"), list):
        data["teachers"] = [{"model": t} if isinstance(t, str) else t for t in data["teachers"]]
    return data


def resolve_config(source: str | Path) -> tuple[Path, str]:
    """The file a config ``source`` names, and how to say which was used.

    A path is a file, a preset is a name: ``source`` is a file path when it is a
    :class:`~pathlib.Path` or contains a path separator or ends in ``.yaml`` / ``.yml``; a
    bare name is the preset of that name when there is one (a file or folder of the same
    name in the working directory is then not used: write ``./NAME`` for it), else a file
    in the working directory. A folder is never a config (one clear error, no traceback).
    """
    text = str(source)
    presets = list_presets()
    path = Path(text).expanduser()
    is_path = (isinstance(source, Path) or "/" in text or "\\" in text
               or path.suffix in (".yaml", ".yml"))
    if not is_path and text in presets:
        shadow = ""
        if path.exists():
            kind = "folder" if path.is_dir() else "file"
            shadow = f"; not the {kind} ./{text} (write ./{text} for that)"
        return preset_path(text), f"preset {text}{shadow}"
    if path.is_dir():
        raise ConfigError("", f"{text!r} is a folder, not a config file: name a YAML file "
                          f"or a preset (presets: {', '.join(presets)})")
    if not path.is_file():
        close = difflib.get_close_matches(path.stem if is_path else text, presets, n=1)
        hint = f"did you mean the preset {close[0]!r}? " if close else ""
        raise ConfigError("", f"config file {text!r} not found ({hint}presets: "
                          f"{', '.join(presets)})")
    return path, f"file {text}"


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML file (or a preset name, or a dict) and apply ``--set`` overrides
    (``section.key=value``; list items by index: ``teachers.0.model=...`` or
    ``teachers[0].model=...``). See :func:`resolve_config` for names vs paths."""
    if isinstance(source, dict):
        data = dict(source)
    else:
        path, _ = resolve_config(source)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("", f"{path}: invalid YAML: {_yaml_problem(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                "not a text file" if isinstance(exc, UnicodeDecodeError) else str(exc)
            raise ConfigError("", f"{path}: cannot read the config: {reason}") from None
        if not isinstance(data, dict):
            raise ConfigError("", f"{path}: a run config is a mapping of sections (name:, "
                              f"output:, data:, teachers:, ...), but this file holds a "
                              f"{_yaml_kind(data)}")
    data = _with_teacher_defaults(data)
    apply_overrides(data, overrides or [])
    return config_from_dict(_with_teacher_defaults(data))


def _yaml_kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number",
            bool: "boolean"}.get(type(value), type(value).__name__)


class _KeepGiven(argparse.Action):
    """Store a positional value only when one was given (so ``--config`` can fill it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None:
            setattr(namespace, self.dest, values)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``CONFIG`` positional with ``--config CONFIG`` as an alias: one way everywhere."""
    parser.add_argument("config", nargs="?", action=_KeepGiven, default=None,
                        help="run config YAML file or preset name (see `fadrm presets`)")
    parser.add_argument("--config", dest="config", metavar="CONFIG", default=None,
                        help="the same, as an option")


def list_presets() -> list[str]:
    root = resources.files("fadrm") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    return Path(str(resources.files("fadrm") / "presets" / f"{name}.yaml"))


def preset_purpose(name: str) -> str:
    """A preset's purpose: the first comment line of its YAML file."""
    for line in preset_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""
