"""One listed image file, and decoding files to uint8 tensors with a thread pool (an
unreadable file is skipped and reported, never fatal)."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from fadrm import storage
from fadrm.config import DataConfig
from fadrm.data.images import Progress, center_offsets, eval_resize_shape

log = logging.getLogger("fadrm.data")

_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_unreadable(uri: str, error: str) -> None:
    """Say once per process that ``uri`` is skipped: the stages that decode the same files
    (squeeze's training set, then select's candidates) would each say it again. Every
    decode still skips the file and records it; later mentions go to the debug log."""
    if mark_said(uri):
        log.warning("skipping unreadable image %s: %s", uri, error)
    else:
        log.debug("skipping unreadable image %s (again): %s", uri, error)


def mark_said(uri: str) -> bool:
    """Record that ``uri`` was said to be unreadable; True the first time in this process
    (a caller whose worker process said it records it here with this alone)."""
    with _warned_lock:
        first = uri not in _warned
        _warned.add(uri)
    return first


@dataclass(frozen=True)
class _File:
    uri: str
    rel: str
    """Path relative to the root, '/'-separated: the file's identity in splits."""
    label: int
    size: int
    mtime_ns: int


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
                warn_unreadable(files[i].uri, result)
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
