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

The data-parallel student (``student.batches_per_step`` K > 1, a protocol variant): each
optimiser step takes K stored batches (global batch K x stored batch, each stored batch
still split into the same micro-batches), rank r of W takes whole stored batches r, r + W,
... of the step, and the learning rate ramps linearly, step by step, from ``lr`` to
:func:`scaled_lr` over the warm-up epochs, under the same per-epoch cosine. The step's
gradient is the mean over its K stored batches whatever W is; K = 1 is the paper's step, op
for op. Its ranks keep their own BatchNorm running statistics (no broadcast from rank 0),
at a momentum that gives each rank's average one rank's horizon in steps
(:func:`_rank_bn_momentum`), averaged over the ranks before each evaluation, so that they
stand for every stored batch as one rank's do.

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
from timm.utils import distribute_bn
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
           "micro_loss_sum", "param_groups", "scaled_lr", "step_lr", "step_groups",
           "train_student"]


def cosine_lr(base_lr: float, epoch: int, num_epochs: int, eta: float) -> float:
    """``base_lr * 0.5 * (1 + cos(pi * epoch / (num_epochs * eta)))``; eta = 2 ends at half."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / (num_epochs * eta)))


def scaled_lr(base_lr: float, batches_per_step: int, rule: str) -> float:
    """The data-parallel student's learning rate for K = ``batches_per_step`` stored batches
    per step: ``base_lr * K`` (``linear``, the default: an epoch's K-times fewer steps add
    up to the same learning rate) or ``base_lr * sqrt(K)`` (``sqrt``: the square-root rule
    for Adam, which keeps the update's noise scale as the batch grows). K = 1 gives
    ``base_lr``."""
    if rule == "sqrt":
        return base_lr * math.sqrt(batches_per_step)
    if rule == "linear":
        return base_lr * batches_per_step
    raise ValueError(f"unknown lr scaling rule {rule!r} (sqrt or linear)")


def step_lr(cfg: StudentConfig, epoch: int, num_epochs: int, step: int,
            steps_per_epoch: int) -> float:
    """The learning rate of optimiser step ``step`` (counted from the run's start), taken
    in ``epoch``: the per-epoch cosine (:func:`cosine_lr`) of a base that ramps linearly
    from ``cfg.lr`` to :func:`scaled_lr` over ``cfg.warmup(num_epochs)`` epochs of steps
    (Goyal et al.'s gradual warm-up) and stays there. The paper's step (K = 1, no warm-up)
    gives ``cosine_lr(cfg.lr, epoch, ...)`` exactly."""
    peak = scaled_lr(cfg.lr, cfg.batches_per_step, cfg.lr_scaling)
    ramp = cfg.warmup(num_epochs) * steps_per_epoch
    base = cfg.lr + (peak - cfg.lr) * (step + 1) / ramp if step < ramp else peak
    return cosine_lr(base, epoch, num_epochs, cfg.eta)


def step_groups(num_batches: int, batches_per_step: int) -> list[range]:
    """The stored batches of each optimiser step of an epoch: ``batches_per_step``
    consecutive ones (the last step takes what is left)."""
    return [range(g, min(g + batches_per_step, num_batches))
            for g in range(0, num_batches, batches_per_step)]


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
        "step": _step_protocol(cfg, num_epochs, run.world),
        "seconds": time.perf_counter() - start_time,
        "train_seconds": time.perf_counter() - start_time - eval_seconds,
    }


def _step_protocol(cfg: StudentConfig, num_epochs: int, world: int) -> dict:
    """What an optimiser step was: the paper's (one stored batch), or the data-parallel
    variant with its global batch in stored batches, ranks, lr rule and warm-up."""
    if not cfg.data_parallel:
        return {"protocol": "paper", "batches_per_step": 1}
    return {"protocol": "data-parallel", "batches_per_step": cfg.batches_per_step,
            "ranks": world, "lr_scaling": cfg.lr_scaling,
            "peak_lr": scaled_lr(cfg.lr, cfg.batches_per_step, cfg.lr_scaling),
            "warmup_epochs": cfg.warmup(num_epochs)}


def _evaluate_sharded(run: _Run, val: ImageSet, is_shard: bool = False) -> tuple[float, float]:
    """Top-1 / top-5 on ``val``: each rank evaluates its strided share (``val`` itself when
    it already is one), counts are summed over the ranks."""
    if run.world > 1 and run.cfg.data_parallel:
        # Rank r's running statistics follow only its stored batches (r, r + W, ...): their
        # average over the ranks stands for all of them, as one rank's do with W = 1.
        distribute_bn(run.model, run.world, reduce=True)
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
    # The data-parallel student's ranks see different stored batches: each keeps its own
    # BatchNorm statistics, averaged before every evaluation (see _evaluate_sharded).
    net = wrap_ddp(model, device, world, broadcast_buffers=not cfg.data_parallel)
    if cfg.data_parallel and world > 1:
        _rank_bn_momentum(model, world)
    # AdamW with the step count off the device's critical path (fused on CUDA).
    optimizer = adam(param_groups(model, cfg.weight_decay), device, cfg.lr, decoupled=True)
    scaler = grad_scaler(device, cfg.mixed_precision, precision)
    # The uint8 images stay on the device for the whole run (views render there).
    return _Run(model, net, optimizer, scaler, images.to(device), cfg, mean, std,
                num_classes, device, rank, world, precision)


def _rank_bn_momentum(model: nn.Module, world: int) -> None:
    """Each of the data-parallel student's W ranks folds only every W-th stored batch into
    its BatchNorm running statistics, so with the same momentum ``m`` its average would
    reach W times as many optimiser steps back as one rank's (weights that have moved on
    since). ``1 - (1 - m) ** W`` per update gives each rank one rank's horizon in steps;
    their average at evaluation then has W times its samples. A cumulative average
    (``momentum=None``) is left as it is."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            module.momentum = 1.0 - (1.0 - module.momentum) ** world


def _train_epoch(run: _Run, table: pa.Table, epoch: int, num_epochs: int) -> dict:
    """One epoch: one optimiser step per ``batches_per_step`` stored batches, each at its
    learning rate (:func:`step_lr`: it changes once per epoch unless warming up)."""
    cfg = run.cfg
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
    groups = step_groups(len(batches), cfg.batches_per_step)
    run.net.train()
    loss_total = torch.zeros((), dtype=torch.float64, device=run.device)
    # Micro-batch losses of each step on this rank (read for finiteness now and then).
    per_rank = -(-cfg.batches_per_step // run.world) if cfg.data_parallel else 1
    checks = torch.zeros(len(groups), per_rank * cfg.accumulation_steps, device=run.device)
    checked = 0
    lr = float("nan")
    for s, group in enumerate(groups):
        step = step_lr(cfg, epoch, num_epochs, run.steps, len(groups))
        if step != lr:  # the epoch's first step, and each step of the warm-up
            lr = step
            for param_group in run.optimizer.param_groups:
                param_group["lr"] = lr
        loss_total += _train_step(run, batches, targets, labels.hard, group, checks[s])
        if (s + 1) % _CHECK_EVERY == 0:
            _check_finite(run, checks, checked, s + 1, epoch)
            checked = s + 1
    _check_finite(run, checks, checked, len(groups), epoch)
    loss_total = all_reduce_sum(loss_total, run.device)
    return {"epoch": epoch, "top1": None, "top5": None,
            "loss": float(loss_total) / len(groups), "lr": lr}


_CHECK_EVERY = 100
"""Steps between reads of the losses' finiteness (each read waits for the device)."""


def _check_finite(run: _Run, checks: torch.Tensor, start: int, stop: int, epoch: int) -> None:
    """Raise on the first non-finite micro-batch loss of steps ``start:stop`` (with the
    paper's step a step is a stored batch)."""
    if stop <= start:
        return
    chunk = checks[start:stop].cpu()
    bad = (~torch.isfinite(chunk)).nonzero()
    if len(bad):
        s, k = (int(v) for v in bad[0])
        where = (f"step {start + s} (stored batches from {(start + s) * run.cfg.batches_per_step})"
                 if run.cfg.data_parallel else f"batch {start + s}")
        raise RuntimeError(f"non-finite student loss at epoch {epoch}, {where} "
                           f"(rank {run.rank}): {float(chunk[s, k])}")


def _step_work(run: _Run, batches: EpochViews, group: range) -> list[tuple[int, np.ndarray]]:
    """This rank's (stored batch, micro-batch positions) of one step. The paper's step:
    micro-batches r, r + W, ... of the one stored batch; data-parallel: every micro-batch
    of stored batches r, r + W, ... of the step."""
    acc = run.cfg.accumulation_steps
    if not run.cfg.data_parallel:
        b = group.start
        return [(b, p) for p in micro_batches(batches.size(b), acc)[run.rank::run.world]]
    return [(b, p) for b in group[run.rank::run.world]
            for p in micro_batches(batches.size(b), acc)]


def _train_step(run: _Run, batches: EpochViews, targets: torch.Tensor, hard: bool,
                group: range, checks: torch.Tensor) -> torch.Tensor:
    """One optimiser step on the stored batches ``group`` (the global batch); returns this
    rank's part of the global batch's mean loss (the ranks' parts add up to it), on the
    device.

    Each stored batch is split into ``accumulation_steps`` micro-batches (the BatchNorm
    batch); :func:`_step_work` says which this rank trains. Each micro-batch's loss is
    ``sum_loss(micro) * W / B`` (B: the global batch's rows): DDP averages gradients over
    the W ranks, so the step's gradient is the global batch's mean loss gradient, whatever
    W is. A rank without a micro-batch runs one zero-weight sample, as DDP needs every
    rank. A stored batch is rendered once (a view reads its CutMix partner's view) and each
    micro-batch is a slice of it: the same pixels as rendering the micro-batch alone.
    ``checks[k]`` receives the rank's k-th micro-batch loss sum.
    """
    full = sum(batches.size(b) for b in group)
    work = _step_work(run, batches, group)
    weights = [1.0] * len(work)
    if not work:
        work, weights = [(group.start, np.zeros(1, dtype=np.int64))], [0.0]
    part = torch.zeros((), dtype=torch.float64, device=run.device)
    rendered = -1
    for k, ((b, positions), weight) in enumerate(zip(work, weights)):
        if b != rendered:
            views, batch_targets, rendered = batches.render(b), targets[batches.rows(b)], b
        last = k == len(work) - 1
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
