"""Initial images P: realism-scored real patches (RDED-style), random real images, noise.

Every initialiser is deterministic per ``(seed, class id)``: a class gets the same images no
matter which other classes share the call, so a work unit (a block of classes) can be
recomputed by any worker on any attempt and produce the same bytes.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from fadrm.config import SelectConfig
from fadrm.data import DataError, ImageSet, normalize

__all__ = ["class_generator", "score_realism", "select_patches", "random_real", "noise_init"]


def class_generator(seed: int, class_id: int, purpose: str) -> torch.Generator:
    """A CPU generator for one (purpose, seed, class); independent streams per purpose."""
    digest = hashlib.sha256(f"{purpose}:{seed}:{class_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def score_realism(
    teacher: nn.Module,
    patches_norm: torch.Tensor,
    labels: torch.Tensor,
    image_size: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Realism of each patch: ``-CE(teacher(resize(patch, image_size)), label)``.

    ``patches_norm`` are normalised float patches ``[B, C, h, w]``; the teacher runs in eval
    mode (its previous mode is restored). Returns float32 ``[B]`` on the CPU.
    """
    if patches_norm.shape[0] != labels.shape[0]:
        raise ValueError(
            f"score_realism: {patches_norm.shape[0]} patches but {labels.shape[0]} labels"
        )
    was_training = teacher.training
    teacher.eval()
    scores = []
    try:
        for start in range(0, patches_norm.shape[0], batch_size):
            x = patches_norm[start : start + batch_size].to(device, torch.float32)
            y = labels[start : start + batch_size].to(device)
            if x.shape[-2:] != (image_size, image_size):
                x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                  align_corners=False)
            logits = teacher(x).float()
            scores.append(-F.cross_entropy(logits, y, reduction="none").cpu())
    finally:
        teacher.train(was_training)
    if not scores:
        return torch.empty(0)
    return torch.cat(scores)


_BOX_TRIES = 10  # torchvision's RandomResizedCrop tries this often before its centre crop


def _random_boxes(
    sizes: torch.Tensor, scale: list[float], ratio: list[float], generator: torch.Generator
) -> torch.Tensor:
    """One RandomResizedCrop box per row of ``sizes`` (``[n, 2]`` as (H, W) of the image it
    is cut from): ``[n, 4]`` as (x0, y0, x1, y1).

    torchvision's sampling: area fraction uniform in ``scale``, aspect ratio (w / h)
    log-uniform in ``ratio``; a box that does not fit is drawn again (up to 10 tries), then
    falls back to the centre crop of the image clamped to ``ratio``. Sides and offsets are
    whole pixels, so a box is an exact pixel crop. Draws are vectorised in a fixed order
    (areas, ratios when the range is not one value, redraws, rows, columns): with square
    images and ``ratio`` [1, 1] nothing is redrawn, which keeps the boxes (and the bytes)
    of the square-only sampler this replaced.
    """
    n = sizes.shape[0]
    height, width = sizes[:, 0].float(), sizes[:, 1].float()
    lo, hi = scale
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])

    def draw(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        area = height[rows] * width[rows] * (
            lo + (hi - lo) * torch.rand(len(rows), generator=generator))
        aspect = torch.full_like(area, ratio[0]) if log_lo == log_hi else torch.exp(
            log_lo + (log_hi - log_lo) * torch.rand(len(rows), generator=generator))
        return ((area * aspect).sqrt().round().clamp(min=1),
                (area / aspect).sqrt().round().clamp(min=1))

    w, h = draw(torch.arange(n))
    for _ in range(_BOX_TRIES - 1):
        misfit = ((w > width) | (h > height)).nonzero().flatten()
        if len(misfit) == 0:
            break
        w[misfit], h[misfit] = draw(misfit)
    y0 = (torch.rand(n, generator=generator) * (height - h + 1)).floor()
    x0 = (torch.rand(n, generator=generator) * (width - w + 1)).floor()
    misfit = (w > width) | (h > height)
    if misfit.any():  # torchvision's fallback: the centre crop, its ratio clamped to range
        fw, fh = width[misfit], height[misfit]
        shape = fw / fh
        fw, fh = (torch.where(shape > ratio[1], (fh * ratio[1]).round(), fw),
                  torch.where(shape < ratio[0], (fw / ratio[0]).round(), fh))
        w[misfit], h[misfit] = fw, fh
        y0[misfit] = ((height[misfit] - fh) / 2).floor()
        x0[misfit] = ((width[misfit] - fw) / 2).floor()
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def _crop_resize(
    images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, side: int
) -> torch.Tensor:
    """Crop ``boxes`` (one per output) from float ``images`` and resize each to ``side``.

    roi_align does all crops in one batched call; with ``aligned=True`` and adaptive sampling
    it is bilinear resampling (align_corners=False) that averages several samples per output
    pixel when shrinking, i.e. a mild anti-alias.
    """
    rois = torch.cat([image_index.to(boxes.dtype)[:, None], boxes], dim=1)
    rois = rois.to(images.device, images.dtype)
    return roi_align(images, rois, (side, side), spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)


def _crop_images(
    images: list[torch.Tensor], image_index: torch.Tensor, boxes: torch.Tensor, side: int,
    device: torch.device,
) -> torch.Tensor:
    """:func:`_crop_resize` of uint8 ``[C, H, W]`` images that may differ in size (box ``i``
    is cut from ``images[image_index[i]]``): float ``[n, C, side, side]`` in [0, 1].

    Images of one size share one roi_align call; no padding, so every crop is exactly what
    it would be on its own image.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(j)
    out: torch.Tensor | None = None
    for members in groups.values():
        src = torch.stack([images[j] for j in members]).to(device).float().div_(255.0)
        if len(groups) == 1:
            return _crop_resize(src, image_index, boxes, side)
        local = torch.full((len(images),), -1, dtype=torch.long)
        local[members] = torch.arange(len(members))
        rows = (local[image_index] >= 0).nonzero().flatten()
        part = _crop_resize(src, local[image_index[rows]], boxes[rows], side)
        if out is None:
            out = part.new_empty((len(boxes), *part.shape[1:]))
        out[rows.to(out.device)] = part
    assert out is not None, "no images to crop"
    return out


def _stitch(patches: torch.Tensor, factor: int, size: int) -> torch.Tensor:
    """``[n * factor^2, C, p, p]`` patches -> ``[n, C, size, size]`` images, row-major."""
    n = patches.shape[0] // factor**2
    c, p = patches.shape[1], patches.shape[-1]
    grid = patches.reshape(n, factor, factor, c, p, p)  # (image, row, col, C, y, x)
    images = grid.permute(0, 3, 1, 4, 2, 5).reshape(n, c, factor * p, factor * p)
    if factor * p != size:  # odd sizes: p = size // factor leaves a pixel out
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


def _class_name(train: ImageSet, class_id: int) -> str:
    name = train.classes[class_id] if 0 <= class_id < len(train.classes) else "?"
    return f"class {class_id} ({name!r})"


def _image_shape(train) -> tuple[int, int, int]:
    """(C, H, W) of the images a source serves (an ImageSet or a DataSource)."""
    if isinstance(train, ImageSet):
        return tuple(train.images.shape[1:])
    return train.cfg.channels, train.cfg.resolution, train.cfg.resolution


def select_patches(
    teacher: nn.Module,
    train: ImageSet,
    class_ids: list[int],
    ipc: int,
    cfg: SelectConfig,
    mean: list[float],
    std: list[float],
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Initial images from the most realistic real patches, ``uint8 [K, ipc, C, H, W]``.

    Per class: draw ``min(m, available)`` real images, crop ``c`` random square patches of
    each (side ``H // factor``), score them with :func:`score_realism`, keep each image's best
    patch, then the class's ``ipc * factor^2`` best patches by descending realism.

    With ``factor = 2`` image ``k`` is stitched from the patches ranked ``4k .. 4k+3``,
    placed row-major: rank ``4k`` top-left, ``4k+1`` top-right, ``4k+2`` bottom-left,
    ``4k+3`` bottom-right. With ``factor = 1`` image ``k`` is the patch ranked ``k``.
    """
    if ipc <= 0:
        raise ValueError(f"select_patches: ipc must be > 0, got {ipc}")
    channels, height, width = _image_shape(train)
    if height != width:
        raise ValueError(f"select_patches: needs square images, got {height}x{width}")
    out = torch.empty(len(class_ids), ipc, channels, height, width, dtype=torch.uint8)
    for k, class_id in enumerate(class_ids):
        out[k] = _select_class(teacher, train, class_id, ipc, cfg, mean, std, seed, device)
    return out


def _select_class(
    teacher: nn.Module,
    train: ImageSet,
    class_id: int,
    ipc: int,
    cfg: SelectConfig,
    mean: list[float],
    std: list[float],
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    size = _image_shape(train)[-1]
    side = size // cfg.factor
    crops = cfg.num_crops
    need = ipc * cfg.factor**2
    pool_size = train.class_size(class_id)
    num = min(cfg.num_candidates, pool_size)
    if num < need:
        raise DataError(
            f"select_patches: {_class_name(train, class_id)} has {num} usable patches "
            f"(one per real image, {pool_size} images) but needs {need} "
            f"(ipc {ipc} x factor^2 {cfg.factor**2})"
        )
    gen = class_generator(seed, class_id, "select")
    # Only the m candidates are decoded (a source may be a whole data set on storage): at
    # their stored sizes with full_resolution (the boxes are drawn on each original, so a
    # patch may lie outside the centre square and small patches keep their detail), else
    # the resolution x resolution centre squares.
    order = torch.randperm(pool_size, generator=gen).tolist()
    candidates = (train.class_originals(class_id, order, num) if cfg.full_resolution
                  else list(train.class_images(class_id, order, num)))
    if len(candidates) < need:
        raise DataError(
            f"select_patches: {_class_name(train, class_id)} has only {len(candidates)} "
            f"readable images but needs {need} (ipc {ipc} x factor^2 {cfg.factor**2})")
    num = len(candidates)
    sizes = torch.tensor([tuple(c.shape[-2:]) for c in candidates], dtype=torch.long)
    boxes = _random_boxes(sizes.repeat_interleave(crops, dim=0), cfg.crop_scale,
                          cfg.crop_ratio, gen)
    crop_image = torch.arange(num).repeat_interleave(crops)

    # Score in chunks of whole images so memory stays bounded by the batch size; patches are
    # not kept: the winners are cropped again from their boxes afterwards.
    scores = torch.empty(num * crops)
    per_chunk = max(1, cfg.batch_size // crops)
    for start in range(0, num, per_chunk):
        stop = min(num, start + per_chunk)
        rows = slice(start * crops, stop * crops)
        patches = _crop_images(candidates[start:stop], crop_image[rows] - start, boxes[rows],
                               side, device)
        labels = torch.full((patches.shape[0],), class_id, dtype=torch.long)
        scores[rows] = score_realism(
            teacher, normalize(patches, mean, std), labels, size, cfg.batch_size, device
        )

    best_score, best_crop = scores.view(num, crops).max(dim=1)
    ranked = torch.argsort(best_score, descending=True, stable=True)[:need]
    winner_boxes = boxes[ranked * crops + best_crop[ranked]]
    winners = torch.cat([  # in chunks, like scoring: originals can be large
        _crop_images([candidates[i] for i in ranked[s:s + per_chunk].tolist()],
                     torch.arange(min(per_chunk, need - s)), winner_boxes[s:s + per_chunk],
                     side, device)
        for s in range(0, need, per_chunk)])
    return _to_uint8(_stitch(winners, cfg.factor, size)).cpu()


def random_real(train: ImageSet, class_ids: list[int], ipc: int, seed: int) -> torch.Tensor:
    """``ipc`` distinct random real images per class, ``uint8 [K, ipc, C, H, W]``."""
    channels, height, width = _image_shape(train)
    out = torch.empty(len(class_ids), ipc, channels, height, width, dtype=torch.uint8)
    for k, class_id in enumerate(class_ids):
        pool_size = train.class_size(class_id)
        if pool_size < ipc:
            raise DataError(
                f"random_real: {_class_name(train, class_id)} has {pool_size} images "
                f"but ipc is {ipc}"
            )
        gen = class_generator(seed, class_id, "random-real")
        chosen = train.class_images(class_id, torch.randperm(pool_size, generator=gen).tolist(),
                                    ipc)
        if chosen.shape[0] < ipc:
            raise DataError(f"random_real: {_class_name(train, class_id)} has only "
                            f"{chosen.shape[0]} readable images but ipc is {ipc}")
        out[k] = chosen
    return out


def noise_init(
    class_ids: list[int], ipc: int, channels: int, size: int, seed: int
) -> torch.Tensor:
    """SRe2L's start: N(0, 1) noise in *normalised* space, float32 ``[K, ipc, C, S, S]``.

    Takes class ids (not a count) so each class's noise depends only on (seed, class), like
    the other initialisers. Values outside the pixel range are clamped by recover's first step.
    """
    out = torch.empty(len(class_ids), ipc, channels, size, size)
    for k, class_id in enumerate(class_ids):
        gen = class_generator(seed, class_id, "noise")
        out[k] = torch.randn(ipc, channels, size, size, generator=gen)
    return out

