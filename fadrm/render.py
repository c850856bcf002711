"""One epoch of views rendered on the device without reading anything back.

:func:`fadrm.relabel.view_batch` turns one batch's :class:`~fadrm.relabel.Views` into pixels,
moving the batch's parameters (five small host arrays) to the device and the CutMix switch
back; on CUDA each of those copies waits for the stream. :class:`EpochViews` moves a whole
epoch's parameters at once (one pinned, non-blocking copy per dtype), keeps what the host
needs (batch bounds, whether a batch mixes) on the host, and renders each batch from the
uint8 images already on the device. Same pixels, bit for bit, as ``view_batch``: every view
reads only its own source image (gathered here in row order instead of sorted order) and
its partner's view, and the arithmetic is the same op for op.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import roi_align

__all__ = ["EpochViews", "to_device"]


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: pinned and non-blocking on CUDA (no stream wait), a plain
    tensor elsewhere. The pinned buffer is kept alive by the caching host allocator until
    the copy has run."""
    t = torch.as_tensor(array)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class EpochViews:
    """One epoch's views (rows sorted by batch, pos) packed on ``device``.

    ``images`` are the uint8 ``[N, C, H, W]`` images on ``device``; ``mean`` / ``std`` the
    normalisation. :meth:`render` gives batch ``b``'s views exactly as ``view_batch``.
    """

    def __init__(self, views, images: torch.Tensor, mean: list[float], std: list[float],
                 out_size: int, device: torch.device):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"EpochViews needs uint8 [N, C, H, W] images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"views assume square images, got {tuple(images.shape[-2:])}")
        n = len(views)
        if n and (views.image_id.min() < 0 or views.image_id.max() >= images.shape[0]):
            raise ValueError(f"view image_id out of range for {images.shape[0]} images")
        self.slices = list(views.batch_slices())
        for s in self.slices:
            b = s.stop - s.start
            if not np.array_equal(views.pos[s], np.arange(b)):
                raise ValueError("EpochViews needs every batch's rows in position order")
            if views.mix_partner[s].max() >= b:
                raise ValueError(f"CutMix partner outside batch of {b}")
        # What the host decides per batch, decided here once (no device read later).
        self.mixes = [bool((views.mix_partner[s] >= 0).any()) for s in self.slices]
        ints = np.concatenate([
            views.image_id[:, None], views.flip[:, None], views.mix_partner[:, None],
            views.mix_box,
        ], axis=1).astype(np.int64)
        self._ints = to_device(ints, device)  # [N, 7]: id, flip, partner, box (4)
        self._crop = to_device(np.ascontiguousarray(views.crop, dtype=np.float32), device)
        self.images = images
        self.device = device
        self.out_size = out_size
        stats = np.array([mean, std], dtype=np.float32).reshape(2, 1, -1, 1, 1)
        self._mean, self._std = to_device(stats, device).unbind(0)
        self._grid = torch.arange(out_size, device=device)

    def __len__(self) -> int:
        return len(self.slices)

    def rows(self, b: int) -> slice:
        return self.slices[b]

    def size(self, b: int) -> int:
        """Rows (views) of batch ``b``."""
        return self.slices[b].stop - self.slices[b].start

    def render(self, b: int) -> torch.Tensor:
        """Normalised fp32 views of batch ``b`` ``[B, C, out, out]`` on the device."""
        s = self.slices[b]
        ints, crop = self._ints[s], self._crop[s]
        # Normalisation as fadrm.data.normalize (x / 255, then (x - mean) / std).
        src = self.images[ints[:, 0]].float() / 255.0
        x = (src - self._mean) / self._std
        return _apply(x, crop, ints, self.mixes[b], self.out_size, self._grid)


def _apply(x: torch.Tensor, crop: torch.Tensor, ints: torch.Tensor, mixes: bool,
           out_size: int, grid: torch.Tensor) -> torch.Tensor:
    """``apply_views`` on device parameters: view ``i`` reads ``x[i]``."""
    dtype = x.dtype
    side = x.shape[-1]
    crop = crop.to(dtype) * side
    top, left, height, width = crop.unbind(1)
    ids = torch.arange(x.shape[0], device=x.device, dtype=dtype)
    boxes = torch.stack([ids, left, top, left + width, top + height], dim=1)
    out = roi_align(x, boxes, output_size=out_size, spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)
    flip = ints[:, 1].bool()
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if mixes:
        partner, box = ints[:, 2], ints[:, 3:7]
        inside_y = (grid[None, :] >= box[:, 0:1]) & (grid[None, :] < box[:, 2:3])
        inside_x = (grid[None, :] >= box[:, 1:2]) & (grid[None, :] < box[:, 3:4])
        mask = inside_y[:, :, None] & inside_x[:, None, :] & (partner >= 0)[:, None, None]
        out = torch.where(mask[:, None], out[partner.clamp(min=0)], out)
    return out
