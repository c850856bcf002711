"""MNIST-style IDX files (``train-*`` / ``t10k-*``, raw or ``.gz``); t10k is the
validation split."""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib

import numpy as np
import torch

from fadrm import storage
from fadrm.config import DataConfig
from fadrm.data.images import DataError, ImageSet, Progress, _finish
from fadrm.data.splits import _select


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# sha256 of the decompressed Fashion-MNIST label files (train, t10k): recognises the data
# set wherever it lives, whatever the directory is called and whether it is gzipped.
_FASHION_LABEL_DIGESTS = {
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_CLASSES_FILE = "classes.txt"


def _decompress(data: bytes, source: str) -> bytes:
    if data[:2] != b"\x1f\x8b":  # gzip magic; anything else is taken as raw IDX
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{source}: corrupt gzip data ({exc})") from exc


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (raw or gzip) into a numpy array with the file's shape and type."""
    data = _decompress(data, source)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{source}: not an IDX file (bad magic number {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{source}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{source}: IDX header says shape {tuple(dims)} ({expected} bytes) but the file "
            f"holds {len(data) - header} bytes of data (truncated or corrupt?)"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _idx_uri(root: str, base: str) -> str:
    """The stored file for ``base``: raw or ``.gz``."""
    for name in (base, base + ".gz"):
        uri = storage.join(root, name)
        if storage.exists(uri):
            return uri
    raise FileNotFoundError(
        f"IDX file not found: expected {storage.join(root, base)} or "
        f"{storage.join(root, base + '.gz')}. For Fashion-MNIST run "
        f"`apt-get install dataset-fashion-mnist` and set data.root to "
        f"/usr/share/datasets/fashion-mnist"
    )


def _idx_split(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(uint8 [N, 1, H, W], int64 [N], sha256 of the decompressed label bytes)."""
    images_base, labels_base = IDX_FILES[split]
    images_uri, labels_uri = _idx_uri(root, images_base), _idx_uri(root, labels_base)
    images = parse_idx(storage.read_bytes(images_uri), images_uri)
    label_bytes = _decompress(storage.read_bytes(labels_uri), labels_uri)
    labels = parse_idx(label_bytes, labels_uri)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_uri}: expected uint8 images [N, H, W], got "
                        f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_uri}: expected {len(images)} labels (one per image in "
                        f"{images_uri}), got shape {labels.shape}")
    return (
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        hashlib.sha256(label_bytes).hexdigest(),
    )


def _idx_classes(root: str, num_labels: int, label_digests: set[str]) -> list[str]:
    """classes.txt if present, Fashion-MNIST names if recognised, else "0", "1", ..."""
    names_uri = storage.join(root, _CLASSES_FILE)
    if storage.exists(names_uri):
        names = [ln.strip() for ln in storage.read_bytes(names_uri).decode().splitlines()]
        names = [n for n in names if n]
        if len(names) < num_labels:
            raise DataError(f"{names_uri}: lists {len(names)} class names but the labels "
                            f"go up to {num_labels - 1}")
        return names
    if label_digests & _FASHION_LABEL_DIGESTS or (
        "fashion" in root.lower() and num_labels == len(FASHION_MNIST_CLASSES)
    ):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(num_labels)]


def _load_idx(cfg: DataConfig, progress: Progress | None) -> tuple[ImageSet, ImageSet]:
    # IDX ships its own test split (t10k), so val_per_class does not apply here.
    (train_x, train_y, train_digest) = _idx_split(cfg.root, "train")
    (val_x, val_y, val_digest) = _idx_split(cfg.root, "val")
    num_labels = max(int(y.max()) if len(y) else -1 for y in (train_y, val_y)) + 1
    classes = _idx_classes(cfg.root, num_labels, {train_digest, val_digest})
    keep = _select(train_y.tolist(), [str(i) for i in range(len(train_y))], cfg.split_seed,
                   cfg.max_train_per_class, None)
    train = ImageSet(train_x[keep], train_y[keep], classes)
    keep = _select(val_y.tolist(), [str(i) for i in range(len(val_y))], cfg.split_seed,
                   None, cfg.max_val)
    val = ImageSet(val_x[keep], val_y[keep], classes)
    if progress is not None:
        total = len(train) + len(val)
        progress(total, total)
    return _finish(train, cfg), _finish(val, cfg, cfg.val_crop_ratio)


def _idx_digest(cfg: DataConfig) -> str:
    h = hashlib.sha256()
    for split in ("train", "val"):
        for base in IDX_FILES[split]:
            h.update(f"{base}:{storage.file_sha256(_idx_uri(cfg.root, base))}\n".encode())
    names_uri = storage.join(cfg.root, _CLASSES_FILE)
    if storage.exists(names_uri):
        h.update(f"{_CLASSES_FILE}:{storage.file_sha256(names_uri)}\n".encode())
    return h.hexdigest()
