"""Helpers shared by the two training loops (squeeze: teachers, student)."""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Trainer", "all_reduce_sum", "alone", "param_groups", "polled_allreduce", "world",
           "wrap_ddp"]


@dataclass
class Trainer:
    """The state every step of a training loop needs (squeeze and student extend it)."""

    model: nn.Module
    net: nn.Module
    """``model``, or its DDP wrapper (see :func:`wrap_ddp`)."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int,
             broadcast_buffers: bool = True) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks, else itself.
    ``broadcast_buffers``: rank 0's BatchNorm statistics overwrite the others' at every
    forward (DDP's default); off, each rank keeps its own (average them with timm's
    ``distribute_bn(..., reduce=True)`` before evaluating)."""
    if world_size <= 1:
        return model
    ddp = nn.parallel.DistributedDataParallel
    # Newer torch names the per-forward broadcast forward_sync_buffers (the buffers are
    # still synced once at wrapping, as every rank starts from the same ones anyway).
    name = ("forward_sync_buffers" if "forward_sync_buffers" in
            inspect.signature(ddp).parameters else "broadcast_buffers")
    net = ddp(model, device_ids=[device.index] if device.type == "cuda" else None,
              **{name: broadcast_buffers})
    if dist.get_backend() == "gloo":
        net.register_comm_hook(None, polled_allreduce)
    return net


def polled_allreduce(state, bucket):  # unannotated: DDP checks the hook's annotations
    """DDP communication hook for gloo (CPU) ranks: DDP's own gradient averaging (divide
    the bucket by W, then sum it over the ranks: the same ops, so the same bytes), but
    waited for by polling with ``sched_yield`` instead of sleeping. A rank that sleeps on
    the result gives its core back, and waking it again costs about a millisecond on a
    virtual machine: a pair of ConvNet ranks stepping every few ms took 12.0-12.5 ms a step
    with DDP's default and 8.4-9.6 ms with this hook (benchmarks/README.md, session 10).
    NCCL needs no hook (its all-reduce never blocks the host)."""
    tensor = bucket.buffer().div_(dist.get_world_size())
    work = dist.all_reduce(tensor, async_op=True)
    while not work.is_completed():
        os.sched_yield()
    work.wait()  # raises what the all-reduce failed with (a lost peer, a timeout)
    done: torch.futures.Future = torch.futures.Future()
    done.set_result(tensor)
    return done


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimiser groups: decay on weight matrices/kernels, none on biases and norm parameters.

    Parameters with ``ndim <= 1`` are exactly the biases and the affine parameters of
    BatchNorm/LayerNorm/GroupNorm layers; decaying them only hurts.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` summed over the torch.distributed ranks (as is without a group), on the
    CPU. NCCL reduces only device tensors, gloo CPU ones: the tensor travels accordingly."""
    if world()[1] == 1:
        return values.cpu()
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = values.to(on)
    dist.all_reduce(reduced)
    return reduced.cpu()


_alone = threading.local()


@contextlib.contextmanager
def alone():
    """Within: this thread trains as the only rank, (0, 1), even inside a larger
    torch.distributed group (a stage configured to train on one rank, run by rank 0 of a
    Ray Train worker group: its bytes are then those of a single-process run)."""
    before = getattr(_alone, "on", False)
    _alone.on = True
    try:
        yield
    finally:
        _alone.on = before


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) without one (or
    :func:`alone`)."""
    if getattr(_alone, "on", False):
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
