"""Train a student only on the distilled images and their stored soft labels.

Each epoch replays the stored views exactly (:func:`fadrm.relabel.view_batch`), so the
student sees the very pixels the teachers labelled. Loss: ``KL(softmax(t / T) ||
softmax(s / T))`` averaged over the batch, without the usual ``T^2`` factor (as the paper).
AdamW without weight decay on biases and normalisation parameters; cosine learning rate
``lr * 0.5 * (1 + cos(pi * e / (E * eta)))`` set at the start of every epoch.

Steps and micro-batches (as the paper's code): one optimiser step per stored relabel batch
(the global batch, ``relabel.batch_size`` rows), computed as ``student.accumulation_steps``
micro-batches, whose size is the BatchNorm batch. Distributed data parallel: when
``torch.distributed`` is initialised with ``W > 1`` ranks, rank r renders and trains only
the micro-batches r, r + W, ... of every global batch, so the global batch, the number of
optimiser steps and the gradient of each step do not depend on W (see :func:`_train_step`);
only BatchNorm's running statistics (used at evaluation) follow rank 0's micro-batches.

Hard-label rows (``relabel.label_mode: hard``, the hard-label baseline) replace the KL by
the cross-entropy to ``lam * onehot(y) + (1 - lam) * onehot(y_partner)`` of each stored
CutMix view; everything else (views, optimiser, schedule) is the same.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from fadrm.amp import (
    LEGACY_PRECISION,
    autocast,
    grad_scaler,
    to_layout,
    tune_for_fixed_shapes,
)
from fadrm.config import StudentConfig
from fadrm.data import ImageSet
from fadrm.formats.labels import LabelRows
from fadrm.metrics import evaluate
from fadrm.optim import adam
from fadrm.render import EpochViews, to_device
from fadrm.training import Trainer, all_reduce_sum, param_groups, world as dist_world, wrap_ddp

__all__ = ["cosine_lr", "hard_loss_sum", "kd_loss_sum", "kd_step", "micro_batches",
           "micro_loss_sum", "param_groups", "train_student"]


def cosine_lr(base_lr: float, epoch: int, num_epochs: int, eta: float) -> float:
    """``base_lr * 0.5 * (1 + cos(pi * epoch / (num_epochs * eta)))``; eta = 2 ends at half."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / (num_epochs * eta)))


def kd_loss_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over samples of KL(teacher/T || student/T) in fp32 (divide by B for 'batchmean')."""
    log_p = F.log_softmax(student.float() / temperature, dim=1)
    log_q = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="sum", log_target=True)


def hard_loss_sum(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over samples of the cross-entropy to class-probability ``targets`` (fp32, T=1)."""
    return -(targets.float() * F.log_softmax(student.float(), dim=1)).sum()


def micro_batches(batch_size: int, accumulation_steps: int) -> list[np.ndarray]:
    """Positions of each micro-batch of a stored batch: ``accumulation_steps`` contiguous,
    near-equal parts (empty parts of a short batch are dropped)."""
    parts = np.array_split(np.arange(batch_size), min(accumulation_steps, batch_size))
    return [p for p in parts if len(p)]


def micro_loss_sum(net: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                   cfg: StudentConfig, num_classes: int, hard: bool = False,
                   precision: str = LEGACY_PRECISION) -> torch.Tensor:
    """The student's forward pass on one micro-batch of rendered views ``x`` (channels_last,
    under ``cfg.mixed_precision``'s autocast in ``precision``, :mod:`fadrm.amp`) and its
    summed loss against ``targets``: KL to teacher logits at ``cfg.temperature``, or
    (``hard``) cross-entropy to class-probability targets. Shared by :func:`train_student`
    and :func:`kd_step`."""
    with autocast(x.device, cfg.mixed_precision, precision):
        logits = net(to_layout(x, True))
    if logits.shape[1] != num_classes:
        raise ValueError(f"student outputs {logits.shape[1]} classes, expected {num_classes}")
    t = targets.to(x.device)
    return hard_loss_sum(logits, t) if hard else kd_loss_sum(logits, t, cfg.temperature)


def kd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
            targets: torch.Tensor, cfg: StudentConfig, hard: bool = False,
            scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimiser step of the evaluate stage's student on one stored batch, for a
    training loop of one's own (see :class:`fadrm.DistilledDataset`); returns the batch's
    mean loss.

    ``x``: the batch's rendered views ``[B, C, H, W]``; ``targets``: their stored teacher
    logits (``hard``: class probabilities of hard-label rows). As :func:`train_student` on
    one rank: ``cfg.accumulation_steps`` micro-batches (the BatchNorm batch), each loss
    ``sum / B``, one step; the model is moved to channels_last (the layout the student
    trains in; ``model.to(memory_format=torch.contiguous_format)`` undoes it). ``scaler``:
    the fp16 GradScaler to use on CUDA with mixed precision (:func:`fadrm.amp.grad_scaler`).
    Set the learning rate per epoch with :func:`cosine_lr` and the optimiser up with
    :func:`param_groups`, as the stage does, for the same weights bit for bit.
    """
    device = next(model.parameters()).device
    model.to(memory_format=torch.channels_last)
    model.train()
    full = len(x)
    if full == 0 or len(targets) != full:
        raise ValueError(f"kd_step needs a non-empty batch with one target row per view, got "
                         f"{full} views and {len(targets)} targets")
    total = 0.0
    optimizer.zero_grad(set_to_none=True)
    for positions in micro_batches(full, cfg.accumulation_steps):
        index = torch.as_tensor(positions)
        loss_sum = micro_loss_sum(model, x[index].to(device), targets[index], cfg,
                                  targets.shape[1], hard)
        if not torch.isfinite(loss_sum):
            raise RuntimeError(f"non-finite student loss: {loss_sum.item()}")
        loss = loss_sum * (1.0 / full)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(loss_sum.detach()) / full
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@dataclass
class _Run(Trainer):
    """What every step of one student training needs."""

    images: torch.Tensor
    cfg: StudentConfig
    mean: list[float]
    std: list[float]
    num_classes: int
    device: torch.device
    rank: int
    world: int
    precision: str = "bf16"
    steps: int = 0


def train_student(
    model: nn.Module,
    images: torch.Tensor,
    labels_for_epoch: Callable[[int], pa.Table],
    val: ImageSet,
    cfg: StudentConfig,
    num_epochs: int,
    mean: list[float],
    std: list[float],
    num_classes: int,
    device: torch.device,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    val_is_shard: bool = False,
    precision: str = "bf16",
) -> dict:
    """Train ``model`` on uint8 ``images [N, C, H, W]`` with the stored views and soft labels.

    ``val_is_shard``: each rank holds only its share of the validation set (the counts are
    summed over ranks); otherwise every rank holds all of it and evaluates its share.

    ``labels_for_epoch(e)`` returns a soft-label table holding (at least) epoch ``e``.
    ``precision``: the autocast dtype (:mod:`fadrm.amp`) when ``cfg.mixed_precision``.

    The steps read nothing from the device: the images live there, each epoch's views and
    targets arrive in one copy, and the losses stay there (checked for finiteness every
    ``_CHECK_EVERY`` steps and at the epoch's end).
    Returns the final-epoch top-1/top-5 (the headline), the best evaluated top-1 and its
    epoch, a per-epoch history, the optimiser step count and the wall time. Metrics are
    exact on rank 0.
    """
    if num_epochs <= 0:
        raise ValueError(f"num_epochs must be > 0, got {num_epochs}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    tune_for_fixed_shapes(device)
    start_time = time.perf_counter()
    run = _set_up(model, images, cfg, mean, std, num_classes, device, seed, precision)
    history: list[dict] = []
    best_top1, best_epoch = -1.0, -1
    top1 = top5 = float("nan")
    eval_seconds = 0.0
    for epoch in range(num_epochs):
        entry = _train_epoch(run, labels_for_epoch(epoch), epoch, num_epochs)
        last = epoch == num_epochs - 1
        if last or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0):
            eval_start = time.perf_counter()
            top1, top5 = _evaluate_sharded(run, val, val_is_shard)
            eval_seconds += time.perf_counter() - eval_start
            entry.update(top1=top1, top5=top5)
            if top1 > best_top1:
                best_top1, best_epoch = top1, epoch
        history.append(entry)
        if progress is not None:
            progress(epoch + 1, num_epochs)

    model.to(memory_format=torch.contiguous_format)
    return {
        "top1": top1,
        "top5": top5,
        "top1_best": best_top1,
        "best_epoch": best_epoch,
        "history": history,
        "steps": run.steps,
        "seconds": time.perf_counter() - start_time,
        "train_seconds": time.perf_counter() - start_time - eval_seconds,
    }


def _evaluate_sharded(run: _Run, val: ImageSet, is_shard: bool = False) -> tuple[float, float]:
    """Top-1 / top-5 on ``val``: each rank evaluates its strided share (``val`` itself when
    it already is one), counts are summed over the ranks."""
    part = val
    if run.world > 1 and not is_shard:
        share = torch.arange(run.rank, len(val), run.world)
        part = ImageSet(val.images[share], val.labels[share], val.classes)
    return evaluate(run.model, part, run.mean, run.std, run.device, run.cfg.eval_batch_size,
                    run.cfg.mixed_precision, sharded=run.world > 1)


def _set_up(model, images, cfg, mean, std, num_classes, device, seed,
            precision: str = "bf16") -> _Run:
    torch.manual_seed(seed)  # dropout and any other randomness inside the student
    rank, world = dist_world()
    # channels_last while training (2x faster small convolutions on the CPU, the layout
    # tensor cores want); undone at the end, so saved weights have the usual layout.
    model.to(device, memory_format=torch.channels_last)
    net = wrap_ddp(model, device, world)
    # AdamW with the step count off the device's critical path (fused on CUDA).
    optimizer = adam(param_groups(model, cfg.weight_decay), device, cfg.lr, decoupled=True)
    scaler = grad_scaler(device, cfg.mixed_precision, precision)
    # The uint8 images stay on the device for the whole run (views render there).
    return _Run(model, net, optimizer, scaler, images.to(device), cfg, mean, std,
                num_classes, device, rank, world, precision)


def _train_epoch(run: _Run, table: pa.Table, epoch: int, num_epochs: int) -> dict:
    """One epoch: the learning rate for it, then one optimiser step per stored batch."""
    lr = cosine_lr(run.cfg.lr, epoch, num_epochs, run.cfg.eta)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    labels = LabelRows.read(table, epoch, run.num_classes)
    batches = EpochViews(labels.views, run.images, run.mean, run.std, run.images.shape[2],
                         run.device)
    # Targets are row-wise (hard ones within their stored batch), so the epoch's come in
    # one piece and one copy. Hard-label rows (relabel.label_mode 'hard'): cross-entropy
    # to the CutMix-mixed one-hot targets instead of KL to teacher logits.
    if labels.hard:
        targets = torch.cat([labels[s].targets() for s in batches.slices])
    else:
        targets = labels.targets()
    targets = to_device(targets, run.device)
    run.net.train()
    loss_total = torch.zeros((), dtype=torch.float64, device=run.device)
    checks = torch.zeros(len(batches), run.cfg.accumulation_steps, device=run.device)
    checked = 0
    for b in range(len(batches)):
        loss_total += _train_step(run, batches, targets, labels.hard, b, checks[b])
        if (b + 1) % _CHECK_EVERY == 0:
            _check_finite(run, checks, checked, b + 1, epoch)
            checked = b + 1
    _check_finite(run, checks, checked, len(batches), epoch)
    loss_total = all_reduce_sum(loss_total, run.device)
    return {"epoch": epoch, "top1": None, "top5": None,
            "loss": float(loss_total) / len(batches), "lr": lr}


_CHECK_EVERY = 100
"""Steps between reads of the losses' finiteness (each read waits for the device)."""


def _check_finite(run: _Run, checks: torch.Tensor, start: int, stop: int, epoch: int) -> None:
    """Raise on the first non-finite micro-batch loss of batches ``start:stop``."""
    if stop <= start:
        return
    chunk = checks[start:stop].cpu()
    bad = (~torch.isfinite(chunk)).nonzero()
    if len(bad):
        b, k = (int(v) for v in bad[0])
        raise RuntimeError(f"non-finite student loss at epoch {epoch}, batch {start + b} "
                           f"(rank {run.rank}): {float(chunk[b, k])}")


def _train_step(run: _Run, batches: EpochViews, targets: torch.Tensor, hard: bool, b: int,
                checks: torch.Tensor) -> torch.Tensor:
    """One optimiser step on one stored (global) batch; returns this rank's part of the
    batch's mean loss (the ranks' parts add up to it), on the device.

    The batch is split into ``accumulation_steps`` micro-batches (the BatchNorm batch), and
    rank r trains micro-batches r, r + W, ... only. Each micro-batch's loss is
    ``sum_loss(micro) * W / B``: DDP averages gradients over the W ranks, so the step's
    gradient is the batch's mean loss gradient, whatever W is. A rank without a micro-batch
    (W > number of micro-batches) runs one zero-weight sample, as DDP needs every rank.
    The whole batch is rendered once (a view reads its CutMix partner's view) and each
    micro-batch is a slice of it: the same pixels as rendering the micro-batch alone.
    ``checks[k]`` receives micro-batch k's loss sum (read for finiteness now and then).
    """
    rows = batches.rows(b)
    full = rows.stop - rows.start
    mine = micro_batches(full, run.cfg.accumulation_steps)[run.rank::run.world]
    weights = [1.0] * len(mine)
    if not mine:
        mine, weights = [np.zeros(1, dtype=np.int64)], [0.0]
    views = batches.render(b)
    batch_targets = targets[rows]
    part = torch.zeros((), dtype=torch.float64, device=run.device)
    for k, (positions, weight) in enumerate(zip(mine, weights)):
        last = k == len(mine) - 1
        sync = contextlib.nullcontext() if run.world == 1 or last else run.net.no_sync()
        # Micro-batches are contiguous positions: slices, not index copies.
        micro = slice(int(positions[0]), int(positions[-1]) + 1)
        with sync:
            loss_sum = micro_loss_sum(run.net, views[micro], batch_targets[micro], run.cfg,
                                      run.num_classes, hard, run.precision)
            run.scaler.scale(loss_sum * (weight * run.world / full)).backward()
        checks[k] = loss_sum.detach()
        part += weight * loss_sum.detach().double() / full
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.steps += 1
    return part
