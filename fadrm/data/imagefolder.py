"""ImageFolder trees (one sub-folder per class of image files), local or ``s3://``:
listing, hold-out and subsetting, the listing or content digest, and loading."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs
import torch

from fadrm import storage
from fadrm.config import DataConfig
from fadrm.data.decode import _File, decode_files
from fadrm.data.images import DataError, ImageSet, Progress
from fadrm.data.splits import _order_per_class, _select

log = logging.getLogger("fadrm.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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
