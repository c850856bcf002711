"""Real datasets: ImageFolder trees and IDX files, decoded to uint8 tensors.

Images are held as ``uint8`` tensors ``[N, C, H, W]`` at the configured resolution (the
compact form; 60k Fashion-MNIST images are 47 MB): shorter side resized, centre square;
validation images optionally with torchvision's Resize + CenterCrop (``val_crop_ratio``).
Select alone reads ImageFolder images at their stored size (``decode_originals``), to cut
its patches from the whole image. Models take normalised float input:
``normalize`` / ``denormalize`` convert, ``pixel_bounds`` gives the valid normalised range
that recover clamps to.

``load_data`` reads a data set by its ``kind`` (a registry of formats), local or ``s3://``:

- ``idx``: MNIST-style IDX files (``train-*`` / ``t10k-*``, raw or ``.gz``); t10k is the
  validation split.
- ``imagefolder``: one sub-folder per class of JPEG/PNG/BMP/WebP files. Unreadable files are
  skipped and listed in ``ImageSet.skipped``; one bad file never stops a run.

Every split and subset is chosen by ranking items on a seeded hash of their name (file path
or index), so it is deterministic and adding a file moves at most that file's neighbours.
``data_fingerprint`` hashes what the decoded data depends on, without decoding it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from fadrm import storage
from fadrm.config import DataConfig
from fadrm.errors import InputError

__all__ = [
    "ImageSet",
    "normalize",
    "denormalize",
    "pixel_bounds",
    "DataError",
    "load_data",
    "data_fingerprint",
    "parse_idx",
    "resize_images",
    "convert_channels",
    "IMAGE_EXTENSIONS",
    "FASHION_MNIST_CLASSES",
]

log = logging.getLogger("fadrm.data")

Progress = Callable[[int, int], None]


@dataclass
class ImageSet:
    """A labelled image set held in memory."""

    images: torch.Tensor
    """uint8 [N, C, H, W]"""
    labels: torch.Tensor
    """int64 [N]"""
    classes: list[str]
    """Class names; label i is classes[i]."""
    skipped: list[dict] = field(default_factory=list)
    """Inputs that could not be read: {"path": ..., "error": ...}."""

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def indices_of(self, label: int) -> torch.Tensor:
        return torch.nonzero(self.labels == label, as_tuple=False).flatten()

    def class_size(self, label: int) -> int:
        return int((self.labels == label).sum())

    def class_images(self, label: int, order: Sequence[int], count: int) -> torch.Tensor:
        """``count`` images of class ``label``: its images at positions ``order[:count]``."""
        pool = self.indices_of(label)
        return self.images[pool[torch.as_tensor(list(order)[:count], dtype=torch.long)]]

    def class_originals(self, label: int, order: Sequence[int],
                        count: int) -> list[torch.Tensor]:
        """:meth:`class_images` as a list of ``[C, H, W]`` (an in-memory set is held at
        one size: its originals are its images)."""
        return list(self.class_images(label, order, count))


def _stats(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (or [0, 1] float) images -> normalised float32."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    return (x - _stats(mean, x)) / _stats(std, x)


def denormalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalised float -> uint8 images (clamped to the valid range, rounded)."""
    y = x.float() * _stats(std, x) + _stats(mean, x)
    return (y.clamp(0, 1) * 255.0).round().to(torch.uint8)


def pixel_bounds(mean: list[float], std: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised values of pixel 0 and pixel 1, shaped [1, C, 1, 1]."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


# --------------------------------------------------------------------------- shared helpers


class DataError(InputError):
    """The data set on disk is not usable (empty class, class mismatch, malformed file)."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_RESIZE_CHUNK = 4096  # images per interpolate call: bounds the float32 working memory


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> ``channels`` channels (gray replicated, or RGB -> luma)."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        # ITU-R 601 luma, the same weights PIL uses for mode "L".
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {have}-channel images to {channels} channels")


def eval_resize_shape(height: int, width: int, short: int) -> tuple[int, int]:
    """(H, W) after torchvision's ``Resize(short)``: the shorter side becomes ``short``, the
    longer one ``int(short * long / short_side)`` (truncated, as torchvision does)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(size)`` (its rounding, not floor)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_images(images: torch.Tensor, size: int,
                  crop_ratio: float | None = None) -> torch.Tensor:
    """uint8 [N, C, H, W] -> [N, C, size, size]: shorter side to ``size``, centre crop;
    with ``crop_ratio`` r, shorter side to round(size / r) first (torchvision's evaluation
    transform, see ``DataConfig.val_crop_ratio``).

    Bilinear with antialiasing, so downscaling does not alias.
    """
    n, c, h, w = images.shape
    if crop_ratio is None:
        if h == size and w == size:
            return images
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        top, left = (new_h - size) // 2, (new_w - size) // 2
    else:
        new_h, new_w = eval_resize_shape(h, w, round(size / crop_ratio))
        top, left = center_offsets(new_h, new_w, size)
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, _RESIZE_CHUNK):
        x = images[start : start + _RESIZE_CHUNK].float()
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True,
                          align_corners=False)
        x = x[:, :, top : top + size, left : left + size]
        out[start : start + _RESIZE_CHUNK] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def _rank(keys: Sequence[str], seed: int) -> list[int]:
    """Indices of ``keys`` in a seeded pseudo-random order.

    Each key's position depends only on the key and the seed (not on the other keys), so a
    split stays put when unrelated files are added or removed.
    """
    prefix = f"{seed}\0".encode()
    digests = [hashlib.sha256(prefix + k.encode()).digest() for k in keys]
    return sorted(range(len(keys)), key=digests.__getitem__)


def _order_per_class(labels: Sequence[int], keys: Sequence[str], seed: int) -> dict[int, list[int]]:
    """For every label, its item indices in seeded rank order."""
    out: dict[int, list[int]] = {}
    for i in _rank(keys, seed):
        out.setdefault(int(labels[i]), []).append(i)
    return out


def _balanced_take(per_class: dict[int, list[int]], n: int) -> list[int]:
    """``n`` items taken round-robin over the classes, so small subsets stay balanced."""
    order = sorted(
        ((pos, label, i) for label, idx in per_class.items() for pos, i in enumerate(idx)),
    )
    return sorted(i for _, _, i in order[:n])


def _select(labels: Sequence[int], keys: Sequence[str], seed: int,
            max_per_class: int | None, max_total: int | None) -> list[int]:
    """Sorted indices of a deterministic subset: <= max_per_class per class, <= max_total."""
    if max_per_class is None and max_total is None:
        return list(range(len(labels)))
    per_class = _order_per_class(labels, keys, seed)
    if max_per_class is not None:
        per_class = {c: idx[:max_per_class] for c, idx in per_class.items()}
    total = sum(len(v) for v in per_class.values())
    return _balanced_take(per_class, total if max_total is None else max_total)


def _finish(data: ImageSet, cfg: DataConfig, crop_ratio: float | None = None) -> ImageSet:
    """Convert channels and resolution to what the config asks for."""
    images = resize_images(convert_channels(data.images, cfg.channels), cfg.resolution,
                           crop_ratio)
    return ImageSet(images, data.labels, data.classes, data.skipped)


# --------------------------------------------------------------------------- IDX


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


# --------------------------------------------------------------------------- ImageFolder


@dataclass(frozen=True)
class _File:
    uri: str
    rel: str
    """Path relative to the root, '/'-separated: the file's identity in splits."""
    label: int
    size: int
    mtime_ns: int


_IDX_NAME = re.compile(r"-idx\d-ubyte(\.gz)?$")


def _scan_folder(root: str) -> tuple[list[str], list[_File]]:
    """Class names (sorted sub-folder names) and every image file under them."""
    fs, base = storage.filesystem(root)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"ImageFolder root {root} does not exist")
    if info.type != pafs.FileType.Directory:
        raise DataError(f"ImageFolder root {root} is not a directory")
    base = base.rstrip("/")
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    classes: set[str] = set()
    found: list[tuple[str, str, pafs.FileInfo]] = []
    for e in entries:
        rel = e.path[len(base) + 1 :]
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):  # .DS_Store, .ipynb_checkpoints, ...
            continue
        if e.type == pafs.FileType.Directory and len(parts) == 1:
            classes.add(parts[0])
        elif (e.type == pafs.FileType.File and len(parts) > 1
              and e.extension.lower() in {x[1:] for x in IMAGE_EXTENSIONS}):
            found.append((parts[0], rel, e))
    idx = sorted(e.base_name for e in entries
                 if e.type == pafs.FileType.File and _IDX_NAME.search(e.base_name))
    # IDX files (Fashion-MNIST, MNIST) where images were expected: name the likely fix.
    idx_hint = f"; it holds IDX files ({idx[0]}, ...): set data.kind: idx" if idx else ""
    if not classes:
        raise DataError(f"ImageFolder root {root} has no class sub-folders "
                        f"(expected {root}/<class name>/<image files>){idx_hint}")
    names = sorted(classes)
    label_of = {name: i for i, name in enumerate(names)}
    files = sorted(
        (_File(storage.join(root, rel), rel, label_of[cls], int(e.size or 0), int(e.mtime_ns or 0))
         for cls, rel, e in found),
        key=lambda f: f.rel,
    )
    labels_seen = {f.label for f in files}
    for name in names:
        if label_of[name] not in labels_seen:
            raise DataError(
                f"class folder {storage.join(root, name)} contains no images "
                f"({', '.join(IMAGE_EXTENSIONS)}){idx_hint}"
            )
    return names, files


def _open(file: _File, mode: str, at_least: int) -> Image.Image:
    """One image file, decoded to ``mode``. JPEG only: the decoder downscales by DCT scaling
    (large photos decode much faster) while both sides stay >= ``at_least``."""
    data = storage.read_bytes(file.uri)
    with Image.open(io.BytesIO(data)) as img:
        img.draft(mode, (at_least, at_least))
        return img.convert(mode)  # forces the full decode: truncated data raises here


def _decode(file: _File, size: int, mode: str, crop_ratio: float | None = None) -> np.ndarray:
    """One image file -> uint8 [H, W] or [H, W, 3] at size x size: the centre square, or
    with ``crop_ratio`` torchvision's Resize(round(size / r)) + CenterCrop(size)."""
    if crop_ratio is None:
        img = ImageOps.fit(_open(file, mode, size), (size, size), Image.Resampling.BILINEAR)
        return np.array(img, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
    short = round(size / crop_ratio)
    img = _open(file, mode, short)
    height, width = eval_resize_shape(img.height, img.width, short)
    if (height, width) != (img.height, img.width):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    top, left = center_offsets(height, width, size)
    return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _decode_original(file: _File, size: int, mode: str) -> np.ndarray:
    """One image file -> uint8 [H, W] or [H, W, 3] at its stored size (a JPEG DCT-scaled
    only while its shorter side stays >= ``size``): what select cuts its patches from."""
    return np.array(_open(file, mode, size), dtype=np.uint8)


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def _decode_each(
    files: list[_File], decode: Callable[[_File], np.ndarray], threads: int,
    progress: Progress | None, skipped: list[dict],
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(i, uint8 [C, H, W])`` per readable file, in order; an unreadable file is
    logged and added to ``skipped`` (its path and error) instead."""

    def work(f: _File) -> np.ndarray | str:
        try:
            return decode(f)
        # PIL signals malformed input with many exception types (OSError, ValueError,
        # SyntaxError, DecompressionBombError, ...): any of them means "skip this file".
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fadrm-decode") as pool:
        for i, result in enumerate(pool.map(work, files)):
            if isinstance(result, str):
                log.warning("skipping unreadable image %s: %s", files[i].uri, result)
                skipped.append({"path": files[i].uri, "error": result})
            else:
                yield i, _to_chw(result)
            if progress is not None:
                progress(i + 1, len(files))


def decode_files(
    files: list[_File], cfg: DataConfig, progress: Progress | None = None, threads: int = 2,
    crop_ratio: float | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """Decode ``files`` with ``threads`` threads to ``cfg.resolution`` squares (``crop_ratio``:
    see :func:`_decode`).

    Returns one image per *readable* file, in the order of ``files``, and the skipped ones.
    """
    mode = "RGB" if cfg.channels == 3 else "L"
    size = cfg.resolution
    out = torch.empty((len(files), cfg.channels, size, size), dtype=torch.uint8)
    ok = torch.zeros(len(files), dtype=torch.bool)
    skipped: list[dict] = []
    decode = lambda f: _decode(f, size, mode, crop_ratio)  # noqa: E731
    for i, image in _decode_each(files, decode, threads, progress, skipped):
        out[i] = image
        ok[i] = True
    return out[ok], skipped


def decode_originals(
    files: list[_File], cfg: DataConfig, threads: int = 2,
) -> tuple[list[torch.Tensor], list[dict]]:
    """Decode ``files`` at their stored sizes (see :func:`_decode_original`): one uint8
    ``[C, H, W]`` per readable file, in order, and the skipped ones."""
    mode = "RGB" if cfg.channels == 3 else "L"
    skipped: list[dict] = []
    decode = lambda f: _decode_original(f, cfg.resolution, mode)  # noqa: E731
    out = [image for _, image in _decode_each(files, decode, threads, None, skipped)]
    return out, skipped


def _holdout(
    files: list[_File], cfg: DataConfig, class_names: list[str],
) -> tuple[list[_File], list[_File]]:
    """Split ``files`` into (train, val) with ``val_per_class`` held-out images per class."""
    per_class = _order_per_class([f.label for f in files], [f.rel for f in files],
                                 cfg.split_seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label, idx in per_class.items():
        if len(idx) <= cfg.val_per_class:
            raise DataError(
                f"class folder {storage.join(cfg.root, class_names[label])} has {len(idx)} "
                f"images; data.val_per_class={cfg.val_per_class} would leave none for training"
            )
        val_idx += idx[: cfg.val_per_class]
        train_idx += idx[cfg.val_per_class :]
    return [files[i] for i in sorted(train_idx)], [files[i] for i in sorted(val_idx)]


def _limit_files(files: list[_File], cfg: DataConfig, max_per_class: int | None,
                 max_total: int | None) -> list[_File]:
    keep = _select([f.label for f in files], [f.rel for f in files], cfg.split_seed,
                   max_per_class, max_total)
    return [files[i] for i in keep]


def _folder_splits(cfg: DataConfig) -> tuple[list[str], list[_File], list[_File]]:
    """Class names and the (train, val) files to decode, after splitting and subsetting."""
    classes, train, val, _ = folder_listing(cfg)
    return classes, train, val


_HASH_THREADS = 16
"""Files read at once for a content fingerprint (I/O-bound: more than the cores helps on
object stores and network filesystems)."""


def _content_digests(files: list[_File], tag: str) -> list[str]:
    def one(f: _File) -> str:
        try:
            return storage.file_sha256(f.uri, (f.mtime_ns, f.size))
        except OSError as e:
            raise DataError(f"{f.uri}: cannot read it for data.fingerprint=content: {e}") from e

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=_HASH_THREADS, thread_name_prefix="fadrm-hash") as pool:
        digests = list(pool.map(one, files))
    log.info("data.fingerprint=content: hashed %d %s files in %.1f s", len(files), tag,
             time.monotonic() - started)
    return digests


def _listing_digest(scans: list[tuple[str, list[_File]]], mode: str = "listing") -> str:
    """Digest of every listed file: (path, size, mtime), or (path, sha256 of the bytes) for
    ``mode == 'content'``. The two modes give different digests for the same tree."""
    content = mode == "content"
    h = hashlib.sha256(b"content\n" if content else b"")
    for tag, files in scans:
        idents = (_content_digests(files, tag) if content
                  else [f"{f.size}\0{f.mtime_ns}" for f in files])
        for f, ident in zip(files, idents):
            h.update(f"{tag}\0{f.rel}\0{ident}\n".encode())
    return h.hexdigest()


def folder_listing(cfg: DataConfig) -> tuple[list[str], list[_File], list[_File], str]:
    """One scan of each root: class names, the (train, val) files after splitting and
    subsetting, and the digest of everything listed (for the data fingerprint)."""
    classes, files = _scan_folder(cfg.root)
    scans = [("train", files)]
    if cfg.val_root:
        val_classes, val_files = _scan_folder(cfg.val_root)
        scans.append(("val", val_files))
        if val_classes != classes:
            missing = sorted(set(classes) - set(val_classes))
            extra = sorted(set(val_classes) - set(classes))
            raise DataError(
                f"validation root {cfg.val_root} must have the same class folders as "
                f"{cfg.root}; missing: {missing[:5]}, extra: {extra[:5]}"
            )
        train_files = files
    elif cfg.val_per_class > 0:
        train_files, val_files = _holdout(files, cfg, classes)
    else:
        train_files, val_files = files, []
    train_files = _limit_files(train_files, cfg, cfg.max_train_per_class, None)
    val_files = _limit_files(val_files, cfg, None, cfg.max_val)
    return classes, train_files, val_files, _listing_digest(scans, cfg.fingerprint)


def _shifted(progress: Progress | None, base: int, total: int) -> Progress | None:
    """``progress`` for a part of a decode that starts after ``base`` of ``total`` images."""
    if progress is None:
        return None
    return lambda done, _: progress(base + done, total)


def _load_imagefolder(cfg: DataConfig, progress: Progress | None) -> tuple[ImageSet, ImageSet]:
    classes, train_files, val_files = _folder_splits(cfg)
    if not val_files:
        log.warning("no validation images: set data.val_root or data.val_per_class")
    # One decode per split (validation may use the evaluation transform); progress counts
    # the images of both.
    total = len(train_files) + len(val_files)
    sets = []
    for base, files, ratio in ((0, train_files, None),
                               (len(train_files), val_files, cfg.val_crop_ratio)):
        images, skipped = decode_files(files, cfg, _shifted(progress, base, total),
                                       crop_ratio=ratio)
        bad = {s["path"] for s in skipped}
        labels = torch.tensor([f.label for f in files if f.uri not in bad], dtype=torch.long)
        sets.append(ImageSet(images, labels, classes, skipped))
    train, val = sets
    for label in set(range(len(classes))) - set(train.labels.tolist()):
        log.warning("class %r has no readable training images", classes[label])
    return train, val


def _imagefolder_digest(cfg: DataConfig) -> str:
    scans = [("train", _scan_folder(cfg.root)[1])]
    if cfg.val_root:
        scans.append(("val", _scan_folder(cfg.val_root)[1]))
    return _listing_digest(scans, cfg.fingerprint)


# --------------------------------------------------------------------------- registry


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
