"""Recover's augmentation: per-sample random resized crop + flip + cyclic shift as one
``grid_sample``, with a whole stage's parameters drawn at once (:func:`augment_axes`).

All randomness comes from a CPU ``torch.Generator``, so results do not depend on the
device; :func:`augment_axes` makes the same draws, in the same order, as that many
:func:`augment` calls, so a loop can move a stage's grids to the device in one copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["augment", "augment_axes", "sample_axes", "sample_grid", "stage_grids"]

_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))  # torchvision's RandomResizedCrop ratio
_CROP_ATTEMPTS = 10


def _boxes_from(
    u_area: torch.Tensor, u_ratio: torch.Tensor, offsets: torch.Tensor, height: int,
    width: int, scale: list[float] | tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample RandomResizedCrop boxes (torchvision's rule, continuous sizes) from their
    uniform draws ``[..., 10]`` (area), ``[..., 10]`` (ratio), ``[..., 2]`` (offset).

    Returns centre x, centre y, width, height in pixels, each ``[...]``. Ten attempts per
    sample; the first that fits wins; if none fits, the whole image (ratio-clamped) is used.
    Element-wise along the leading dimensions, so many steps' boxes come from one call."""
    lo, hi = float(scale[0]), float(scale[1])
    area = height * width * (lo + (hi - lo) * u_area)
    ratio = torch.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u_ratio)
    w = torch.sqrt(area * ratio)
    h = torch.sqrt(area / ratio)
    fits = (w <= width) & (h <= height)
    first = fits.int().argmax(dim=-1, keepdim=True)  # argmax returns the first maximum
    w = w.gather(-1, first).squeeze(-1)
    h = h.gather(-1, first).squeeze(-1)

    in_ratio = width / height
    if in_ratio < 3 / 4:
        full_w, full_h = float(width), width / (3 / 4)
    elif in_ratio > 4 / 3:
        full_w, full_h = height * (4 / 3), float(height)
    else:
        full_w, full_h = float(width), float(height)
    any_fit = fits.any(dim=-1)
    w = torch.where(any_fit, w, torch.full_like(w, full_w))
    h = torch.where(any_fit, h, torch.full_like(h, full_h))

    cx = offsets[..., 0] * (width - w) + w / 2
    cy = offsets[..., 1] * (height - h) + h / 2
    return cx, cy, w, h


def augment(
    x: torch.Tensor,
    size: int,
    crop_scale: list[float] | tuple[float, float],
    flip: bool,
    jitter: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per-sample random resized crop + flip + cyclic shift, differentiable w.r.t. ``x``.

    Crop and flip are one affine sampling grid per sample (bilinear, align_corners=False;
    the grid ``F.affine_grid`` would give, built separably because it has no shear); the
    cyclic shift (``torch.roll`` semantics, ``|shift| <= jitter`` per axis) permutes the
    grid's rows and columns, so the whole augmentation is a single ``grid_sample``. All
    randomness comes from the CPU ``generator``, so results do not depend on the device.
    """
    batch, _, height, width = x.shape
    axes = augment_axes(batch, height, width, size, crop_scale, flip, jitter, generator, 1)
    return sample_axes(x, axes[0].to(x.device, x.dtype))


def augment_axes(
    batch: int, height: int, width: int, size: int,
    crop_scale: list[float] | tuple[float, float], flip: bool, jitter: int,
    generator: torch.Generator, steps: int,
) -> torch.Tensor:
    """The sampling-grid axes of ``steps`` successive :func:`augment` calls, fp32 on the CPU,
    ``[steps, 2, batch, size]`` (x then y): the same draws from ``generator``, in the same
    order, and the same values as ``steps`` separate calls, so a loop can draw a whole stage
    at once and move it to the device in one copy."""
    if steps == 0:
        return torch.zeros(0, 2, batch, size)
    # One step's draws in augment's order (crop areas, ratios, offsets, flip bits, then the
    # shifts): drawing a whole stage per call would reorder the generator's stream. The
    # uniform draws of a step are one call: a CPU generator fills a tensor element by
    # element from one stream, so rand(a + b) is rand(a) then rand(b) (a test checks it).
    # The arithmetic on them is element-wise, so it runs once for the stage.
    per_step = batch * (2 * _CROP_ATTEMPTS + 2 + int(flip))
    uniform, shifts = [], []
    for _ in range(steps):
        uniform.append(torch.rand(per_step, generator=generator))
        if jitter > 0:
            shifts.append(torch.randint(-jitter, jitter + 1, (batch, 2), generator=generator))
    u = torch.stack(uniform)
    ends = [k * batch for k in (_CROP_ATTEMPTS, 2 * _CROP_ATTEMPTS, 2 * _CROP_ATTEMPTS + 2)]
    u_area = u[:, :ends[0]].reshape(steps, batch, _CROP_ATTEMPTS)
    u_ratio = u[:, ends[0]:ends[1]].reshape(steps, batch, _CROP_ATTEMPTS)
    u_offsets = u[:, ends[1]:ends[2]].reshape(steps, batch, 2)
    u_flip = u[:, ends[2]:]
    cx, cy, w, h = _boxes_from(u_area, u_ratio, u_offsets, height, width, crop_scale)
    sign = torch.where(u_flip < 0.5, -1.0, 1.0) if flip else torch.ones(steps, batch)
    shifts = (torch.stack(shifts).transpose(1, 2) if jitter > 0
              else torch.zeros(steps, 2, batch, dtype=torch.long))  # [steps, 2, batch]
    scale_shift = torch.stack([sign * w / width, 2 * cx / width - 1,
                               h / height, 2 * cy / height - 1], dim=1)  # [steps, 4, batch]
    # The grid F.affine_grid would build for theta = [[sign*w/W, 0, tx], [0, h/H, ty]]: with
    # no shear it is separable, so build its columns and rows ([size] each per sample)
    # directly. roll: out[i] = in[(i - shift) mod n], i.e. output pixel i samples grid
    # position (i - shift) mod n. Element-wise ops only: batching the steps changes no bit.
    index = (torch.arange(size) - shifts[..., None]) % size  # [steps, 2, batch, size]
    centres = (2 * index + 1) / size - 1  # output pixel centres in [-1, 1]
    return scale_shift[:, 0::2, :, None] * centres + scale_shift[:, 1::2, :, None]


def sample_axes(x: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` of ``x [B, C, H, W]`` on the separable grid ``axes [2, B, size]``
    (from :func:`augment_axes`, already on ``x``'s device and dtype)."""
    return sample_grid(x, axes[0][:, None, :], axes[1][:, :, None])


def stage_grids(axes: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's x and y axes of ``axes [steps, 2, B, size]`` as ``([B, 1, size], [B,
    size, 1])`` views for :func:`sample_grid`: made by a few ops for the whole stage, so a
    step indexes nothing on the device."""
    return list(zip(axes[:, 0, :, None, :].unbind(0), axes[:, 1, :, :, None].unbind(0)))


def sample_grid(x: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` of ``x [B, C, H, W]`` on the grid whose point (i, j) is ``(gx[b, 0,
    j], gy[b, i, 0])`` (a :func:`stage_grids` pair)."""
    batch, size = gx.shape[0], gx.shape[-1]
    grid = torch.stack([gx.expand(batch, size, size), gy.expand(batch, size, size)], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
