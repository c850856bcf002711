"""Squeeze: train a teacher on the real data (when no pretrained weights are given).

Plain supervised training: SGD with Nesterov momentum (no weight decay on biases and norm
parameters), a short linear warmup into one cosine schedule, label-smoothed cross-entropy,
and standard augmentation applied to whole uint8 batches on the device (padded random crop
for small images, RandomResizedCrop for large ones, horizontal flip). Shuffling and
augmentation come from seeded generators, so a seed reproduces the run.

Under ``torch.distributed`` (world size > 1) the model is wrapped in DDP and every rank
takes a strided share of the same per-epoch permutation; ``cfg.batch_size`` is the global
batch. The training set is either decoded in memory (an ``ImageSet``) or streamed (a
:class:`fadrm.datasource.StreamedSplit`: the same batches, decoded by DataLoader workers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fadrm.amp import autocast, grad_scaler
from fadrm.config import DataConfig, SqueezeConfig
from fadrm.data import ImageSet, normalize
from fadrm.metrics import evaluate
from fadrm.training import Trainer, param_groups, world as dist_world, wrap_ddp

__all__ = ["train_teacher", "augment_batch", "lr_at", "SMALL_IMAGE_MAX"]

SMALL_IMAGE_MAX = 64
"""Images up to this size get padded random crops; larger ones RandomResizedCrop."""
_PAD = 4  # pixels of (reflected) padding for the small-image random crop
_RRC_SCALE = (0.35, 1.0)
_RRC_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
# Whole data sets up to this size are copied to the GPU once instead of batch by batch.
_DEVICE_CACHE_BYTES = 2 << 30


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``base`` to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop + horizontal flip of a normalised float batch [N, C, H, W].

    One affine resampling per image does crop, resize and flip together on the device:
    <= 64 px a shift of up to 4 pixels with reflected borders (the padded random crop),
    larger images a RandomResizedCrop (area 0.35-1, aspect 3/4-4/3). The parameters are drawn
    on the CPU from ``generator``, so they do not depend on the device.
    """
    n, _, h, w = x.shape
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    if max(h, w) <= SMALL_IMAGE_MAX:
        # Whole-pixel shifts: affine_grid's unit is half the image, so one pixel is 2 / size.
        shift = torch.randint(-_PAD, _PAD + 1, (n, 2), generator=generator).float()
        theta[:, 0, 0] = flip
        theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = 2 * shift[:, 0] / w
        theta[:, 1, 2] = 2 * shift[:, 1] / h
    else:
        area = torch.empty(n).uniform_(*_RRC_SCALE, generator=generator)
        log_ratio = torch.empty(n).uniform_(*_RRC_LOG_RATIO, generator=generator)
        ratio = torch.exp(log_ratio)
        bw = torch.sqrt(area * ratio).clamp(max=1.0)  # box size as a fraction of the side
        bh = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - bw)
        cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - bh)
        theta[:, 0, 0] = bw * flip
        theta[:, 1, 1] = bh
        theta[:, 0, 2] = cx
        theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


@dataclass
class _Run(Trainer):
    """What every step of one teacher training needs."""

    images: torch.Tensor | None
    """The decoded training set (None when it streams)."""
    labels: torch.Tensor
    train: object
    cfg: SqueezeConfig
    data_cfg: DataConfig
    device: torch.device
    aug_gen: torch.Generator
    steps_per_epoch: int
    total: int
    warmup: int
    world: int
    step: int = 0


def train_teacher(
    model: nn.Module,
    train: ImageSet,
    val: ImageSet,
    cfg: SqueezeConfig,
    data_cfg: DataConfig,
    device: torch.device,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Train ``model`` in place on ``train``; returns top-1 (%) on ``val`` (nan if empty).

    ``progress(step_done, total_steps)`` is called after every step, on every rank. The
    model is left in eval mode.
    """
    if len(train) == 0:
        raise ValueError("squeeze: the training set is empty")
    rank, world = dist_world()
    run = _set_up(model, train, cfg, data_cfg, device, seed, rank, world)
    # Same permutation on every rank (each takes its strided share); augmentation differs.
    order_gen = torch.Generator().manual_seed(seed)
    per_rank = len(train) // world
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(train), generator=order_gen)[rank::world][:per_rank]
        _train_epoch(run, perm, epoch, progress)
    model.to(memory_format=torch.contiguous_format).eval()
    if len(val) == 0:
        return math.nan
    top1, _ = evaluate(model, val, data_cfg.mean, data_cfg.std, device,
                       mixed_precision=cfg.mixed_precision)
    return top1


def _set_up(model, train, cfg, data_cfg, device, seed, rank, world) -> _Run:
    # channels_last: about 2x faster convolutions on CPU (4x with bf16) and the layout that
    # tensor cores want on CUDA. Undone at the end, so saved weights have the usual layout.
    model.to(device, memory_format=torch.channels_last).train()
    net = wrap_ddp(model, device, world)
    local_batch = max(1, cfg.batch_size // world)
    # Every rank must run the same number of steps (DDP synchronises each one): use an
    # equal share of each epoch and drop the last partial batch.
    steps_per_epoch = max(1, (len(train) // world) // local_batch)
    total = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.SGD(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )
    # A StreamedSplit (too large to hold decoded) has no pixels here: batches are decoded
    # by DataLoader workers as they are needed (fadrm.datasource).
    images, labels = getattr(train, "images", None), train.labels
    if images is not None and device.type == "cuda" \
            and images.numel() * images.element_size() <= _DEVICE_CACHE_BYTES:
        images, labels = images.to(device), labels.to(device)
    return _Run(model, net, optimizer, grad_scaler(device, cfg.mixed_precision), images,
                labels, train, cfg, data_cfg, device,
                torch.Generator().manual_seed(seed * 7919 + 1 + rank), steps_per_epoch,
                total, max(1, min(steps_per_epoch, total // 10)), world)


def _train_epoch(run: _Run, perm: torch.Tensor, epoch: int,
                 progress: Callable[[int, int], None] | None) -> None:
    local_batch = max(1, run.cfg.batch_size // run.world)
    batches = [perm[i * local_batch : (i + 1) * local_batch]
               for i in range(run.steps_per_epoch)]
    if run.images is None:  # streamed: the same batches, decoded by DataLoader workers
        pixels = run.train.batches([b.tolist() for b in batches])
    else:
        pixels = ((run.images[b.to(run.images.device)], run.labels[b.to(run.labels.device)])
                  for b in batches)
    for i, (images, labels) in enumerate(pixels):
        if len(labels):  # (a streamed batch of only unreadable files is skipped)
            _train_step(run, images, labels, epoch, i)
        if progress is not None:
            progress(run.step, run.total)


def _train_step(run: _Run, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                i: int) -> None:
    """One SGD step on a uint8 batch: normalise, augment on the device, forward in mixed
    precision, label-smoothed CE, scaled backward."""
    cfg, device = run.cfg, run.device
    x = normalize(images.to(device, non_blocking=True), run.data_cfg.mean, run.data_cfg.std)
    y = labels.to(device, non_blocking=True)
    x = augment_batch(x, run.aug_gen).contiguous(memory_format=torch.channels_last)
    lr = lr_at(run.step, run.total, run.warmup, cfg.lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with autocast(device, cfg.mixed_precision):
        logits = run.net(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    _check_finite(loss, epoch, cfg.epochs, i, run.steps_per_epoch, lr, run.world)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1


def _check_finite(loss: torch.Tensor, epoch: int, epochs: int, step: int, steps: int,
                  lr: float, world: int) -> None:
    """Stop early on a diverged loss; under DDP all ranks agree, so none is left waiting."""
    value = loss.detach().clone()
    if world > 1:
        dist.all_reduce(value)
    if not torch.isfinite(value):
        raise RuntimeError(
            f"squeeze: non-finite loss ({value.item()}) at epoch {epoch + 1}/{epochs}, "
            f"step {step + 1}/{steps} (lr {lr:.4g}); try a lower squeeze.lr"
        )
