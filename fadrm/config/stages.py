"""The config sections of the stages: squeeze, select, recover, relabel and the student."""

from __future__ import annotations

from dataclasses import dataclass, field

from fadrm.config.checks import ConfigError, _positive, _scale_range, _unit_interval
from fadrm.methods.registry import Method, create_method, is_method, list_methods


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
    ipc_per_forward: int = 1
    """IPC indices of a class block optimised together, in one forward per iteration (GPU
    throughput: more images per kernel launch). Each index keeps its own seed, augmentation
    draws, BN-statistics term and cross-entropy mean, so the images are the one-at-a-time
    ones up to float rounding; a recover unit then holds that many indices (one shard).
    Part of the recover key when not 1. At most ``ipc``."""

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
        _positive(self.ipc_per_forward, f"{p}.ipc_per_forward")


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
    batches_per_forward: int = 1
    """Stored batches labelled per teacher forward (GPU throughput). With teacher_bn_mode
    'train' each bn_splits part keeps its own BN statistics (ghost batch norm): the same
    labels up to float rounding, so a value other than 1 is part of the stage key."""

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
        _positive(self.batches_per_forward, f"{p}.batches_per_forward")


LR_SCALING = ("sqrt", "linear")
"""The data-parallel student's learning-rate rules (:func:`fadrm.student.scaled_lr`)."""


@dataclass(kw_only=True)
class StudentConfig:
    """Student trained only on the distilled images and their stored soft labels."""

    model: str | list[str] = "resnet18"
    """The student model, or a list of them: the evaluation matrix (every model x every
    seed in ``seeds``, each trained and reported on its own; the first is the headline)."""
    seeds: list[int] | None = None
    """Student seeds of the evaluation matrix (initialisation and batch order; the distilled
    set is the same); None -> the run's seed alone. A (model, seed) unit gives the bytes
    of a run whose student is that model and whose seed is that seed."""
    small_stem: bool | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 20.0
    eta: float = 2.0
    """Cosine schedule 0.5 * (1 + cos(pi * epoch / (epochs * eta)))."""
    accumulation_steps: int = 2
    """Micro-batches per stored relabel batch (one optimiser step per stored batch; the
    micro-batch is the BatchNorm batch and the unit data-parallel ranks share out)."""
    batches_per_step: int = 1
    """Stored relabel batches per optimiser step. 1: the paper's step (one stored batch).
    K > 1: the data-parallel student, a protocol variant the report names: the global
    batch is K stored batches (their views, labels and BatchNorm micro-batches unchanged),
    each of the ``execution.train_workers`` ranks takes K / W whole stored batches of every
    step (K a multiple of W; on one rank the K accumulate), the learning rate is scaled by
    ``lr_scaling`` after a warm-up. Set it to ``train_workers`` to spread the student over
    the cluster."""
    lr_scaling: str = "linear"
    """How the data-parallel student scales ``lr`` with K = ``batches_per_step``: ``linear``
    (lr x K: the same lr summed over an epoch's steps; at K = 4 on Fashion-MNIST it
    measured 2.2 points above sqrt, see benchmarks/README.md) or
    ``sqrt`` (lr x sqrt(K), the square-root rule for Adam-type optimisers, the safer one
    for large K: AdamW at 1e-3 x 256 is rarely stable)."""
    warmup_epochs: int | None = None
    """Epochs over which the learning rate ramps, step by step, from ``lr`` to the scaled
    one (then the cosine as usual); None: ceil(epochs / 20) when batches_per_step > 1, else
    0 (with K = 1 there is nothing to ramp)."""
    eval_every: int = 0
    """Evaluate every N epochs (0 -> only at the end); the best epoch is reported too."""
    eval_batch_size: int = 512
    mixed_precision: bool = True

    @property
    def models(self) -> list[str]:
        """The student models, the headline first."""
        return list(self.model) if isinstance(self.model, list) else [self.model]

    @property
    def data_parallel(self) -> bool:
        """The data-parallel protocol variant (several stored batches per step)."""
        return self.batches_per_step > 1

    def warmup(self, epochs: int) -> int:
        """Warm-up epochs of a run of ``epochs`` (``warmup_epochs`` resolved)."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return -(-epochs // 20) if self.data_parallel else 0

    @property
    def is_matrix(self) -> bool:
        """More than today's one student: a list of models or of seeds was given."""
        return isinstance(self.model, list) or self.seeds is not None

    def validate(self, p: str) -> None:
        if not self.models:
            raise ConfigError(f"{p}.model", "needs at least one model")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"{p}.model", f"lists a model twice: {self.models}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"{p}.seeds", f"must be a non-empty list of different seeds, got "
                              f"{self.seeds}")
        _positive(self.lr, f"{p}.lr")
        if self.weight_decay < 0:
            raise ConfigError(f"{p}.weight_decay", "must be >= 0")
        _positive(self.temperature, f"{p}.temperature")
        _positive(self.eta, f"{p}.eta")
        _positive(self.accumulation_steps, f"{p}.accumulation_steps")
        _positive(self.batches_per_step, f"{p}.batches_per_step")
        if self.lr_scaling not in LR_SCALING:
            raise ConfigError(f"{p}.lr_scaling", f"must be one of {sorted(LR_SCALING)}, got "
                              f"{self.lr_scaling!r}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ConfigError(f"{p}.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        if self.eval_every < 0:
            raise ConfigError(f"{p}.eval_every", "must be >= 0")
        _positive(self.eval_batch_size, f"{p}.eval_batch_size")


@dataclass(kw_only=True)
class EvaluateConfig:
    """What the report measures beside the student's top-1."""

    scores: bool = False
    """DD-Ranking's label-robust scores (HLR, IOR, LRS; :mod:`fadrm.scores`). Runs, each
    content-keyed and cached like any run: this config with hard labels, this config's data
    as a random real subset (same soft-label protocol), and the student model trained on the
    full training set with hard labels by the squeeze protocol (free when a squeezed teacher
    is that model). On in the demo preset, where it adds about half a minute."""
    score_weight: float = 0.5
    """w in LRS: alpha = w * IOR - (1 - w) * HLR (DD-Ranking's leaderboard uses 0.5)."""

    def validate(self, p: str) -> None:
        _unit_interval(self.score_weight, f"{p}.score_weight")
