"""FKD-style relabelling: per-epoch views (crop, flip, CutMix) and teacher-ensemble logits.

For every student epoch the distilled set is shuffled into batches and every sample gets a
RandomResizedCrop, a flip bit and (per batch) CutMix parameters. The teachers label the
augmented batch and the logits are stored as Arrow rows *together with the view
parameters*, so the student later rebuilds bit-identical inputs with :func:`apply_views`
instead of re-drawing random augmentations.

Invariants:

* Views depend only on ``(seed, epoch)`` (plus the image count, the config and the output
  size): any worker, on any attempt, produces the same rows.
* Crops are stored as fractions of the source side, so they do not depend on the
  resolution; CutMix boxes are stored in output pixels (they are applied after resizing).
* :func:`view_batch` / :func:`apply_views` are the single code path that turns views into
  pixels; relabel and the student both call it.

The rows' schema, their writers and their reader belong to :mod:`fadrm.formats.labels`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torchvision.ops import roi_align

from fadrm.amp import (
    autocast,
    channels_last_models,
    is_channels_last,
    to_layout,
    tune_for_fixed_shapes,
)
from fadrm.config import RelabelConfig
from fadrm.data import normalize
from fadrm.formats.labels import Views, label_arrays, soft_label_schema, views_arrays
from fadrm.ghost_bn import ghost_batch_norm
from fadrm.render import EpochViews

__all__ = [
    "apply_views",
    "ensemble_logits",
    "make_views",
    "relabel_epochs",
    "teacher_bn_mode",
    "view_batch",
    "view_rows",
]

# RandomResizedCrop's aspect-ratio range and retry count (as torchvision).
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10


# --------------------------------------------------------------------------- views


def make_views(
    seed: int, epoch: int, num_images: int, cfg: RelabelConfig, out_size: int
) -> Views:
    """Draw one epoch of views; a pure function of its arguments.

    All random numbers are drawn whatever the flip/CutMix switches say, so turning one
    augmentation off leaves the others (and the batch order) unchanged.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    if num_images <= 0:
        raise ValueError(f"num_images must be > 0, got {num_images}")
    if out_size <= 0:
        raise ValueError(f"out_size must be > 0, got {out_size}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    n, bs = num_images, cfg.batch_size
    image_id = rng.permutation(n).astype(np.int32)
    rows = np.arange(n)
    crop = _random_crops(rng, n, cfg.crop_scale)
    flip = (rng.random(n) < 0.5) & cfg.flip
    mix_partner, mix_lam, mix_box = _cutmix(rng, n, bs, cfg, out_size)
    return Views(
        epoch=np.full(n, epoch, dtype=np.int32),
        batch=(rows // bs).astype(np.int32),
        pos=(rows % bs).astype(np.int32),
        image_id=image_id,
        crop=crop,
        flip=flip,
        mix_partner=mix_partner,
        mix_lam=mix_lam,
        mix_box=mix_box,
    )


def _random_crops(rng: np.random.Generator, n: int, scale: Sequence[float]) -> np.ndarray:
    """RandomResizedCrop boxes (top, left, height, width) on a square source, as fractions
    of the side: area fraction s and aspect ratio r give width sqrt(s r) and height
    sqrt(s / r). The first of 10 attempts that fits wins; otherwise the whole image
    (torchvision's fallback for a square image, whose ratio 1 lies inside the range)."""
    rows = np.arange(n)
    lo, hi = scale
    area = rng.uniform(lo, hi, size=(n, _CROP_ATTEMPTS))
    ratio = np.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1]), size=(n, _CROP_ATTEMPTS)))
    w_try, h_try = np.sqrt(area * ratio), np.sqrt(area / ratio)
    fits = (w_try <= 1.0) & (h_try <= 1.0)
    first = fits.argmax(axis=1)
    found = fits.any(axis=1)
    h = np.where(found, h_try[rows, first], 1.0)
    w = np.where(found, w_try[rows, first], 1.0)
    top = rng.uniform(0.0, 1.0, size=n) * (1.0 - h)
    left = rng.uniform(0.0, 1.0, size=n) * (1.0 - w)
    return np.stack([top, left, h, w], axis=1).astype(np.float32)


def _cutmix(rng: np.random.Generator, n: int, bs: int, cfg: RelabelConfig,
            out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per batch: lambda ~ Beta, a partner permutation and a box centre (drawn even when
    CutMix is off, so the other draws do not move). Returns (partner, lam, box) per row."""
    mix_partner = np.full(n, -1, dtype=np.int32)
    mix_lam = np.ones(n, dtype=np.float32)
    mix_box = np.zeros((n, 4), dtype=np.int32)
    for start in range(0, n, bs):
        size = min(bs, n - start)
        lam = rng.beta(cfg.cutmix_beta, cfg.cutmix_beta)
        partner = rng.permutation(size)
        cy, cx = rng.integers(0, out_size, size=2)
        if not cfg.cutmix or size < 2:
            continue
        half = int(out_size * math.sqrt(1.0 - lam)) // 2
        y0, y1 = np.clip([cy - half, cy + half], 0, out_size)
        x0, x1 = np.clip([cx - half, cx + half], 0, out_size)
        box_area = int((y1 - y0) * (x1 - x0))
        if box_area == 0:
            continue
        # A sample paired with itself is left unchanged: store it as "no CutMix" so the
        # rows say what happened to the pixels.
        mixed = partner != np.arange(size)
        idx = start + np.flatnonzero(mixed)
        mix_partner[idx] = partner[mixed]
        mix_lam[idx] = 1.0 - box_area / float(out_size * out_size)
        mix_box[idx] = (y0, x0, y1, x1)
    return mix_partner, mix_lam, mix_box


def apply_views(images: torch.Tensor, rows: Views, out_size: int) -> torch.Tensor:
    """Render one whole batch of views from normalised images ``[M, C, H, W]``.

    Crop + resize is ``roi_align`` (aligned, adaptive sampling): bilinear interpolation
    like ``F.interpolate(align_corners=False)`` when enlarging, box-averaged when
    shrinking, one call for the whole batch and deterministic. Then flip, then CutMix
    (box pixels come from the partner's *flipped, cropped* view, as in a CutMix applied to
    an augmented batch).
    """
    b = len(rows)
    if b == 0:
        raise ValueError("apply_views needs at least one row")
    if not np.array_equal(rows.pos, np.arange(b)) or len(np.unique(rows.batch)) != 1:
        raise ValueError("apply_views needs the rows of exactly one batch, in position order")
    if rows.image_id.min() < 0 or rows.image_id.max() >= images.shape[0]:
        raise ValueError(
            f"view image_id out of range: max {int(rows.image_id.max())}, "
            f"but only {images.shape[0]} images"
        )
    if rows.mix_partner.max() >= b:
        raise ValueError(f"CutMix partner {int(rows.mix_partner.max())} outside batch of {b}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"views assume square images, got {tuple(images.shape[-2:])}")
    if not images.is_floating_point():
        raise ValueError("apply_views needs normalised float images (use view_batch for uint8)")

    device, dtype = images.device, images.dtype
    side = images.shape[-1]
    crop = torch.from_numpy(rows.crop).to(device=device, dtype=dtype) * side
    top, left, height, width = crop.unbind(1)
    ids = torch.from_numpy(rows.image_id).to(device=device, dtype=dtype)
    boxes = torch.stack([ids, left, top, left + width, top + height], dim=1)
    out = roi_align(images, boxes, output_size=out_size, spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)

    flip = torch.from_numpy(rows.flip).to(device)
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)

    partner = torch.from_numpy(rows.mix_partner.astype(np.int64)).to(device)
    if (rows.mix_partner >= 0).any():  # decided on the host: no device read
        box = torch.from_numpy(rows.mix_box.astype(np.int64)).to(device)
        grid = torch.arange(out_size, device=device)
        inside_y = (grid[None, :] >= box[:, 0:1]) & (grid[None, :] < box[:, 2:3])  # [B, out]
        inside_x = (grid[None, :] >= box[:, 1:2]) & (grid[None, :] < box[:, 3:4])
        mask = inside_y[:, :, None] & inside_x[:, None, :] & (partner >= 0)[:, None, None]
        # Gather from the un-mixed batch so a partner's own box does not leak in twice.
        source = out[partner.clamp(min=0)]
        out = torch.where(mask[:, None], source, out)
    return out


def view_batch(
    images: torch.Tensor,
    rows: Views,
    mean: list[float],
    std: list[float],
    out_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Render one batch from uint8 images: gather, move, normalise, :func:`apply_views`.

    Only the batch's images are normalised (the full set in fp32 can be many GB). This is
    bit-identical to ``apply_views(normalize(images), rows, out_size)``: normalisation is
    element-wise and each view reads only its own source image.
    """
    ids, local = np.unique(rows.image_id, return_inverse=True)
    if ids[-1] >= images.shape[0] or ids[0] < 0:
        raise ValueError(
            f"view image_id {int(ids[-1])} out of range for {images.shape[0]} images"
        )
    src = images[torch.from_numpy(ids.astype(np.int64)).to(images.device)]
    x = normalize(src.to(device), mean, std)
    local_rows = dataclasses.replace(rows, image_id=local.reshape(-1).astype(np.int32))
    return apply_views(x, local_rows, out_size)


def view_rows(
    images: torch.Tensor,
    rows: Views,
    positions: np.ndarray,
    mean: list[float],
    std: list[float],
    out_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Render only the rows at ``positions`` of one batch's views: bit-identical to
    ``view_batch(...)[positions]``, at the cost of those rows and their CutMix partners.

    Each view reads its own source image and its partner's cropped, flipped view, so only
    that closure is rendered (a data-parallel rank renders its share of a global batch).
    """
    positions = np.asarray(positions, dtype=np.int64)
    partners = rows.mix_partner[positions]
    needed = np.unique(np.concatenate([positions, partners[partners >= 0]]))
    where = {int(p): i for i, p in enumerate(needed)}
    sub = rows[needed]
    # A stand-alone batch of the needed rows: positions renumbered, partners remapped.
    remap = np.array([where.get(int(p), -1) if p >= 0 else -1 for p in sub.mix_partner],
                     dtype=np.int32)
    sub = dataclasses.replace(sub, pos=np.arange(len(needed), dtype=np.int32),
                              batch=np.zeros(len(needed), dtype=np.int32), mix_partner=remap)
    # A row rendered only as a partner may lose its own partner (-1 above): harmless, as
    # CutMix pastes from the un-mixed views and partner-only rows are dropped below.
    out = view_batch(images, sub, mean, std, out_size, device)
    return out[torch.as_tensor([where[int(p)] for p in positions], device=out.device)]


# --------------------------------------------------------------------------- teachers


@contextlib.contextmanager
def teacher_bn_mode(model: nn.Module, bn_mode: str) -> Iterator[nn.Module]:
    """Put a teacher in labelling mode and restore every module's flags afterwards.

    'eval': plain eval mode (running statistics). 'train': BatchNorm layers normalise
    with the batch's statistics but do *not* update their running statistics (nor
    ``num_batches_tracked``), and every other layer stays in eval mode, so dropout never
    makes labels random.
    """
    if bn_mode not in ("train", "eval"):
        raise ValueError(f"bn_mode must be 'train' or 'eval', got {bn_mode!r}")
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    try:
        model.eval()
        if bn_mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    # Training BN without tracking: batch statistics are used and the
                    # running buffers are not passed to batch_norm, so they stay untouched.
                    m.train()
                    m.track_running_stats = False
        yield model
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track


@torch.no_grad()
def ensemble_logits(
    teachers: Sequence[nn.Module],
    x: torch.Tensor,
    bn_mode: str,
    weights: Sequence[float] | None,
    device: torch.device,
    mixed_precision: bool = True,
    precision: str = "bf16",
) -> torch.Tensor:
    """fp32 logits ``[B, K]`` of the teacher ensemble on the whole batch ``x``.

    Uniform mean of the teachers' logits, or weighted by ``softmax(w / 10)``. The whole
    batch goes through each teacher at once, so train-mode BN sees the batch's statistics.
    Teachers must already be on ``device``.
    """
    if not teachers:
        raise ValueError("ensemble_logits needs at least one teacher")
    if weights is not None and len(weights) != len(teachers):
        raise ValueError(f"got {len(weights)} ensemble weights for {len(teachers)} teachers")
    if weights is None:
        coef = torch.full((len(teachers),), 1.0 / len(teachers))
    else:
        coef = torch.softmax(torch.tensor(list(weights), dtype=torch.float64) / 10.0, 0).float()
    x = x.to(device)
    total: torch.Tensor | None = None
    for teacher, c in zip(teachers, coef.tolist(), strict=True):
        with teacher_bn_mode(teacher, bn_mode), \
                autocast(device, mixed_precision, precision):
            logits = teacher(to_layout(x, is_channels_last(teacher)))
        term = logits.float() * c
        if total is not None and term.shape != total.shape:
            raise ValueError(
                f"teachers disagree on the number of classes: {tuple(term.shape)} "
                f"vs {tuple(total.shape)}"
            )
        total = term if total is None else total + term
    assert total is not None
    return total


def relabel_epochs(
    teachers: Sequence[nn.Module],
    images: torch.Tensor,
    mean: list[float],
    std: list[float],
    cfg: RelabelConfig,
    epochs: Sequence[int] | range,
    seed: int,
    device: torch.device,
    weights: Sequence[float] | None = None,
    progress: Callable[[int, int], None] | None = None,
    mixed_precision: bool = True,
    channels_last: bool = True,
    labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    precision: str = "bf16",
    batches_per_forward: int = 1,
) -> pa.Table:
    """Labels for ``epochs``: views + ensemble logits of uint8 ``images [N, C, H, W]``.

    Views are rendered at the images' resolution. Teachers are moved to ``device``; their
    parameters, buffers and train/eval flags are left as they were. ``channels_last``
    runs them in that memory layout meanwhile (2x faster small convolutions on the CPU).
    With ``cfg.label_mode == 'hard'`` no teacher runs: the rows hold the views and each
    image's class from ``labels [N]`` (``num_classes`` is then required).
    ``precision``: the teachers' autocast dtype (:mod:`fadrm.amp`).
    ``batches_per_forward``: stored batches labelled per teacher forward; with BN in
    'train' mode each of their ``bn_splits`` parts keeps its own statistics (ghost batch
    norm, :mod:`fadrm.ghost_bn`): the same labels up to float rounding. 1: as the reference.

    The images move to ``device`` once; each epoch's view parameters in one copy; the
    logits stay on the device until the epoch's rows are built, which is also when their
    finiteness is checked (one device read per epoch, none per batch).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"relabel needs square images, got {tuple(images.shape[2:])}")
    epochs = list(epochs)
    if cfg.label_mode == "hard":
        return _hard_label_rows(images, cfg, epochs, seed, labels, num_classes, progress)
    tune_for_fixed_shapes(device)
    for t in teachers:
        t.to(device)
    with channels_last_models(teachers, channels_last):
        return _relabel_loop(teachers, images, mean, std, cfg, epochs, seed, device, weights,
                             progress, mixed_precision, precision, batches_per_forward)


def _hard_label_rows(images, cfg, epochs, seed, labels, num_classes, progress) -> pa.Table:
    if labels is None or num_classes is None:
        raise ValueError("label_mode 'hard' needs the images' labels and num_classes")
    labels = torch.as_tensor(labels).cpu().numpy().astype(np.int32).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"got {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    schema = soft_label_schema(num_classes, 0, "hard")
    schema = schema.with_metadata({**schema.metadata, b"seed": str(seed).encode()})
    tables = []
    for done, epoch in enumerate(epochs):
        views = make_views(seed, epoch, images.shape[0], cfg, images.shape[2])
        arrays = views_arrays(views) + [pa.array(labels[views.image_id], pa.int32())]
        tables.append(pa.Table.from_arrays(arrays, schema=schema))
        if progress is not None:
            progress(done + 1, len(epochs))
    if not tables:
        raise ValueError("relabel_epochs needs at least one epoch")
    return pa.concat_tables(tables)


def _relabel_loop(teachers, images, mean, std, cfg, epochs, seed, device, weights, progress,
                  mixed_precision, precision="bf16", batches_per_forward=1) -> pa.Table:
    out_size = images.shape[2]
    tables: list[pa.Table] = []
    schema: pa.Schema | None = None
    on_device = images.to(device)
    for done, epoch in enumerate(epochs):
        views = make_views(seed, epoch, images.shape[0], cfg, out_size)
        batches = EpochViews(views, on_device, mean, std, out_size, device)
        if batches_per_forward == 1:
            logits = [_label_batch(teachers, batches.render(b), cfg, weights, device,
                                   mixed_precision, precision) for b in range(len(batches))]
        else:
            logits = [_label_batches(teachers, batches, range(lo, min(lo + batches_per_forward,
                                                                       len(batches))),
                                     cfg, weights, device, mixed_precision, precision)
                      for lo in range(0, len(batches), batches_per_forward)]
        # The epoch's logits come to the host in one copy; finiteness is checked there.
        all_logits = torch.cat(logits).cpu()
        bad = np.flatnonzero(~torch.isfinite(all_logits).all(dim=1).numpy())
        if len(bad):
            raise RuntimeError(f"relabel: non-finite teacher logits at epoch {epoch}, "
                               f"batch {int(views.batch[bad[0]])}")
        if schema is None:
            schema = soft_label_schema(all_logits.shape[1], cfg.top_k)
            schema = schema.with_metadata({**schema.metadata, b"seed": str(seed).encode()})
        arrays = views_arrays(views) + label_arrays(all_logits, cfg.top_k)
        tables.append(pa.Table.from_arrays(arrays, schema=schema))
        if progress is not None:
            progress(done + 1, len(epochs))
    if schema is None:
        raise ValueError("relabel_epochs needs at least one epoch")
    return pa.concat_tables(tables)


def _label_batch(teachers, x: torch.Tensor, cfg: RelabelConfig, weights, device,
                 mixed_precision: bool, precision: str = "bf16") -> torch.Tensor:
    """Ensemble logits of one rendered batch; with BN in train mode, in ``cfg.bn_splits``
    contiguous parts (each part's own batch statistics, as the reference labels halves)."""
    splits = cfg.bn_splits if cfg.teacher_bn_mode == "train" else 1
    parts = [p for p in torch.tensor_split(x, min(splits, len(x))) if len(p)]
    return torch.cat([ensemble_logits(teachers, p, cfg.teacher_bn_mode, weights, device,
                                      mixed_precision, precision) for p in parts])


def _label_batches(teachers, batches: EpochViews, which: range, cfg: RelabelConfig, weights,
                   device, mixed_precision: bool, precision: str) -> torch.Tensor:
    """:func:`_label_batch` of several stored batches in one forward per teacher: with BN in
    train mode, ghost batch norm over the same parts ``_label_batch`` would make."""
    xs = [batches.render(b) for b in which]
    sizes: list[int] = []
    for x in xs:
        splits = cfg.bn_splits if cfg.teacher_bn_mode == "train" else 1
        sizes += [len(p) for p in np.array_split(np.arange(len(x)), min(splits, len(x)))
                  if len(p)]
    with ghost_batch_norm(teachers, sizes):
        return ensemble_logits(teachers, torch.cat(xs), cfg.teacher_bn_mode, weights, device,
                               mixed_precision, precision)
