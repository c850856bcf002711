"""The data kinds by name (``data.kind``) and what is asked of every kind: load, the data
fingerprint, class names and a summary (the last three without decoding an image)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fadrm import storage
from fadrm.config import DataConfig
from fadrm.data.idx import (IDX_FILES, _decompress, _idx_classes, _idx_digest, _idx_uri,
                            _load_idx, parse_idx)
from fadrm.data.imagefolder import (_folder_splits, _imagefolder_digest, _load_imagefolder,
                                    _scan_folder)
from fadrm.data.images import ImageSet, Progress
from fadrm.data.splits import _select


@dataclass(frozen=True)
class _Format:
    load: Callable[[DataConfig, Progress | None], tuple[ImageSet, ImageSet]]
    content_digest: Callable[[DataConfig], str]
    """Cheap digest of the stored files (no decoding)."""


_FORMATS: dict[str, _Format] = {
    "idx": _Format(_load_idx, _idx_digest),
    "imagefolder": _Format(_load_imagefolder, _imagefolder_digest),
}


def _format(cfg: DataConfig) -> _Format:
    cfg.validate("data")
    return _FORMATS[cfg.kind]


def load_data(cfg: DataConfig, progress: Progress | None = None) -> tuple[ImageSet, ImageSet]:
    """Load (train, val) as uint8 ImageSets at ``cfg.resolution`` with ``cfg.channels``.

    ``progress(done, total)`` is called as images are read.
    """
    return _format(cfg).load(cfg, progress)


# Config fields that change the decoded images (mean/std only normalise later).
_DECODE_FIELDS = ("kind", "resolution", "channels", "val_per_class", "max_train_per_class",
                  "max_val", "split_seed")


def data_fingerprint(cfg: DataConfig) -> str:
    """sha256 hex of the stored data plus the decode settings; changes when either does."""
    return fingerprint_from_digest(cfg, _format(cfg).content_digest(cfg))


def fingerprint_from_digest(cfg: DataConfig, content_digest: str) -> str:
    """:func:`data_fingerprint` from an already computed digest of the stored files."""
    h = hashlib.sha256(content_digest.encode())
    for name in _DECODE_FIELDS:
        h.update(f"\n{name}={getattr(cfg, name)!r}".encode())
    h.update(f"\nval_root={bool(cfg.val_root)}".encode())
    # val_crop_ratio is not here: only the evaluate stage's key has it (nothing else reads
    # validation images to make its output).
    return h.hexdigest()


def class_names(cfg: DataConfig) -> list[str]:
    """The class names, without decoding images (for planning work units)."""
    if cfg.kind == "imagefolder":
        return _scan_folder(cfg.root)[0]
    _, labels_base = IDX_FILES["train"]
    uri = _idx_uri(cfg.root, labels_base)
    label_bytes = _decompress(storage.read_bytes(uri), uri)
    labels = parse_idx(label_bytes, uri)
    digest = hashlib.sha256(label_bytes).hexdigest()
    return _idx_classes(cfg.root, int(labels.max()) + 1 if len(labels) else 0, {digest})


@dataclass(frozen=True)
class DataSummary:
    """What a data set holds, from its listing and labels alone (nothing decoded)."""

    classes: list[str]
    train_counts: list[int]
    """Training images per class (after hold-out and max_train_per_class)."""
    val_counts: list[int]
    """Validation images per class (after max_val)."""
    where: str
    """Where the images are: the ImageFolder root (one folder per class) or the IDX file."""
    class_folders: bool = False
    """True for an ImageFolder: each class's images are in ``where/<class name>``."""

    def place(self, name: str) -> str:
        """Where the images of class ``name`` are, for a message: its folder or the file."""
        return storage.join(self.where, name) if self.class_folders else self.where


def summarize(cfg: DataConfig, folder: tuple | None = None) -> DataSummary:
    """Classes and images per class of ``cfg``'s data, checked (train and validation classes
    agree, no class is empty) without decoding an image. ``folder``: an ImageFolder listing
    already made, ``(classes, train files, val files)`` (it is not listed again)."""
    cfg.validate("data")
    if cfg.kind == "imagefolder":
        classes, train_files, val_files = folder or _folder_splits(cfg)
        train, val = [f.label for f in train_files], [f.label for f in val_files]
        where = cfg.root
    else:
        train_base, val_base = IDX_FILES["train"][1], IDX_FILES["val"][1]
        labels = []
        for base in (train_base, val_base):
            uri = _idx_uri(cfg.root, base)
            labels.append(parse_idx(storage.read_bytes(uri), uri).astype(np.int64).tolist())
        classes = class_names(cfg)
        keep = _select(labels[0], [str(i) for i in range(len(labels[0]))], cfg.split_seed,
                       cfg.max_train_per_class, None)
        train = [labels[0][i] for i in keep]
        keep = _select(labels[1], [str(i) for i in range(len(labels[1]))], cfg.split_seed,
                       None, cfg.max_val)
        val = [labels[1][i] for i in keep]
        where = _idx_uri(cfg.root, train_base)
    count = lambda labels: np.bincount(np.asarray(labels, dtype=np.int64),  # noqa: E731
                                       minlength=len(classes)).tolist()
    return DataSummary(classes, count(train), count(val), where,
                       class_folders=cfg.kind == "imagefolder")
