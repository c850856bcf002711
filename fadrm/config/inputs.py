"""The config sections of a run's inputs: the real data and the teachers."""

from __future__ import annotations

from dataclasses import dataclass, field

from fadrm.config.checks import _SHA256, ConfigError, _positive


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
