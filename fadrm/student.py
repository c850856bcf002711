"""Train a student only on the distilled images and their stored soft labels.

Each epoch replays the stored views exactly (:func:`fadrm.relabel.view_batch`), so the
student sees the very pixels the teachers labelled. Loss: ``KL(softmax(t / T) ||
softmax(s / T))`` averaged over the batch, without the usual ``T^2`` factor (as the paper).
AdamW without weight decay on biases and normalisation parameters; cosine learning rate
``lr * 0.5 * (1 + cos(pi * e / (E * eta)))`` set at the start of every epoch.

Distributed data parallel: when ``torch.distributed`` is initialised with ``W > 1`` ranks,
every rank renders the full stored batch (CutMix partners live in the same batch, and
rendering is cheap next to the forward pass) and trains on its strided slice
``rows[rank::W]``. Each rank's loss is ``sum_KL(slice) * W / B``: DDP averages gradients
over ranks, so the synchronised gradient is ``(1 / B) * sum_KL(batch)``, the gradient of
the full batch's mean KL. BatchNorm statistics are per rank slice, as in any DDP run.

Hard-label rows (``relabel.label_mode: hard``, the hard-label baseline) replace the KL by
the cross-entropy to ``lam * onehot(y) + (1 - lam) * onehot(y_partner)`` of each stored
CutMix view; everything else (views, optimiser, schedule) is the same.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fadrm.amp import autocast, grad_scaler, to_layout
from fadrm.config import StudentConfig
from fadrm.data import ImageSet
from fadrm.metrics import evaluate
from fadrm.relabel import (
    epoch_table,
    hard_targets,
    is_hard,
    soft_targets,
    view_batch,
    views_from_table,
)
from fadrm.training import param_groups, world as dist_world

__all__ = ["cosine_lr", "hard_loss_sum", "kd_loss_sum", "param_groups", "train_student"]


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
) -> dict:
    """Train ``model`` on uint8 ``images [N, C, H, W]`` with the stored views and soft labels.

    ``labels_for_epoch(e)`` returns a soft-label table holding (at least) epoch ``e``.
    Returns the final-epoch top-1/top-5 (the headline), the best evaluated top-1 and its
    epoch, a per-epoch history and the wall time. Metrics are exact on rank 0.
    """
    if num_epochs <= 0:
        raise ValueError(f"num_epochs must be > 0, got {num_epochs}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    start_time = time.perf_counter()
    torch.manual_seed(seed)  # dropout and any other randomness inside the student
    rank, world = dist_world()
    out_size = images.shape[2]
    # channels_last while training (2x faster small convolutions on the CPU, the layout
    # tensor cores want); undone at the end, so saved weights have the usual layout.
    model.to(device, memory_format=torch.channels_last)
    net: nn.Module = model
    if world > 1:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scaler = grad_scaler(device, cfg.mixed_precision)
    accum = cfg.accumulation_steps

    history: list[dict] = []
    best_top1, best_epoch = -1.0, -1
    top1 = top5 = float("nan")
    for epoch in range(num_epochs):
        lr = cosine_lr(cfg.lr, epoch, num_epochs, cfg.eta)
        for group in optimizer.param_groups:
            group["lr"] = lr
        table = epoch_table(labels_for_epoch(epoch), epoch)
        _check_num_classes(table, num_classes)
        # Hard-label rows (relabel.label_mode 'hard'): cross-entropy to the CutMix-mixed
        # one-hot targets instead of KL to teacher logits.
        hard = is_hard(table)
        targets_of = hard_targets if hard else soft_targets
        views = views_from_table(table, epoch)
        slices = list(views.batch_slices())
        net.train()
        optimizer.zero_grad(set_to_none=True)
        loss_total = torch.zeros((), dtype=torch.float64)
        pending = 0
        for b, s in enumerate(slices):
            rows = views[s]
            full = len(rows)
            x = view_batch(images, rows, mean, std, out_size, device)
            targets = targets_of(table.slice(s.start, full), num_classes).to(device)
            idx = torch.arange(rank, full, world, device=device)
            share = 1.0
            if idx.numel() == 0:
                # Fewer samples than ranks: this rank still runs forward/backward (DDP's
                # collectives need every rank) on one sample with zero loss weight.
                idx, share = idx.new_zeros(1), 0.0
            step_now = pending + 1 == accum or b == len(slices) - 1
            sync = contextlib.nullcontext() if world == 1 or step_now else net.no_sync()
            with sync:
                with autocast(device, cfg.mixed_precision):
                    logits = net(to_layout(x[idx], True))
                if logits.shape[1] != num_classes:
                    raise ValueError(f"student outputs {logits.shape[1]} classes, "
                                     f"expected {num_classes}")
                if hard:
                    loss_sum = hard_loss_sum(logits, targets[idx])
                else:
                    loss_sum = kd_loss_sum(logits, targets[idx], cfg.temperature)
                if not torch.isfinite(loss_sum):
                    raise RuntimeError(
                        f"non-finite student loss at epoch {epoch}, batch {b} "
                        f"(rank {rank}): {loss_sum.item()}"
                    )
                loss = loss_sum * (share * world / full / accum)
                scaler.scale(loss).backward()
            pending += 1
            if step_now:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                pending = 0
            # This rank's part of the full batch's mean KL; ranks' parts add up to it.
            loss_total += share * loss_sum.detach().double().cpu() / full
        if world > 1:
            # NCCL reduces only device tensors; gloo handles CPU ones.
            on = device if dist.get_backend() == "nccl" else torch.device("cpu")
            reduced = loss_total.to(on)
            dist.all_reduce(reduced)
            loss_total = reduced.cpu()
        epoch_loss = float(loss_total) / len(slices)

        entry: dict = {"epoch": epoch, "top1": None, "top5": None, "loss": epoch_loss, "lr": lr}
        last = epoch == num_epochs - 1
        if last or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0):
            top1, top5 = evaluate(model, val, mean, std, device, cfg.eval_batch_size,
                                  cfg.mixed_precision)
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
        "seconds": time.perf_counter() - start_time,
    }


def _check_num_classes(table: pa.Table, num_classes: int) -> None:
    meta = table.schema.metadata or {}
    stored = meta.get(b"num_classes")
    if stored is not None and int(stored) != num_classes:
        raise ValueError(f"soft labels are for {int(stored)} classes, but the student "
                         f"is trained for {num_classes}")
