"""Data residual matching: optimise the pixels of initial images against frozen teachers.

Loss per iteration::

    CE(teacher(aug(x)), y)
        + r_bn * sum_l m_l * (||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2)

over the inputs of every BatchNorm2d layer (the BN term: :mod:`fadrm.bn_stats`). Around it:
multi-resolution stages (MRO) with a fresh Adam per stage under one cosine schedule, the
adjustable residual connection (ARC)
``x <- alpha resample(x) + (1 - alpha) resample(P)`` at inner stage boundaries (both at the
next stage's resolution, P straight from full resolution), mixed precision (MPT),
and round-robin teachers (FADRM+). Baselines are the same loop with other flags of their
registered method (:class:`~fadrm.methods.Method`, ``cfg.spec``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fadrm.amp import (
    autocast,
    channels_last_models,
    grad_scaler,
    to_layout,
    tune_for_fixed_shapes,
)
from fadrm.config import RecoverConfig
from fadrm.augment import augment, augment_axes, sample_axes, sample_grid, stage_grids
from fadrm.bn_stats import BNStatLoss, bn_term, channel_stats
from fadrm.data import pixel_bounds
from fadrm.optim import adam

__all__ = [
    "BNStatLoss",
    "RecoverResult",
    "augment",
    "augment_axes",
    "bn_term",
    "channel_stats",
    "cosine_lr",
    "recover",
    "resample",
    "sample_axes",
    "sample_grid",
]

_PROGRESS_EVERY = 10


def resample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to ``size x size`` (anti-aliased when shrinking); identity if equal."""
    height, width = x.shape[-2:]
    if (height, width) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < min(height, width))


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """One cosine decay from ``base_lr`` at step 0 to 0 at ``total``."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * step / max(total, 1)))


# --------------------------------------------------------------------------- recover


@dataclass
class RecoverResult:
    """Output of :func:`recover`."""

    images: torch.Tensor
    """Normalised float32 ``[B, C, H, W]`` at the data resolution (on the CPU)."""
    losses: list[float] = field(default_factory=list)
    """Total loss of every iteration."""
    stage_resolutions: list[int] = field(default_factory=list)
    """Resolution actually used by each stage."""
    group_losses: list[list[float]] = field(default_factory=list)
    """Each group's loss of every iteration (one list without groups: ``losses``)."""


StageHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@contextlib.contextmanager
def _frozen(models: list[nn.Module]) -> Iterator[None]:
    """Eval mode, no parameter gradients; the previous state is restored afterwards."""
    saved = [(m.training, [p.requires_grad for p in m.parameters()]) for m in models]
    for m in models:
        m.eval()
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, (training, flags) in zip(models, saved):
            m.train(training)
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


def _compiled(model: nn.Module) -> nn.Module:
    """``torch.compile(model)``, cached on the module so units of a worker compile once."""
    compiled = getattr(model, "_fadrm_compiled", None)
    if compiled is None:
        # dynamic=False: one graph per input shape (one per MRO resolution), no symbolic
        # shapes; the shapes of a recover loop are fixed within a stage.
        compiled = torch.compile(model, dynamic=False)
        # object.__setattr__: not registered as a submodule (state_dict stays unchanged).
        object.__setattr__(model, "_fadrm_compiled", compiled)
    return compiled


def _stages(cfg: RecoverConfig, image_size: int) -> list[tuple[int, int]]:
    """(resolution, iterations) per stage; single-resolution methods get one stage."""
    if cfg.spec.multi_resolution:
        return list(zip(cfg.resolutions, cfg.stage_iterations))
    return [(image_size, cfg.total_iterations)]


def _check_finite(log: torch.Tensor, start: int, stop: int) -> None:
    """Raise on the first non-finite loss in ``log[start:stop]`` (one host sync)."""
    chunk = log[start:stop]
    if not bool(torch.isfinite(chunk).all()):
        bad = start + int((~torch.isfinite(chunk)).nonzero()[0, 0])
        raise RuntimeError(
            f"recover: non-finite loss {float(log[bad].sum())} at iteration {bad}; "
            "try a lower recover.lr or disable mixed precision"
        )


def _check_inputs(init: torch.Tensor, labels: torch.Tensor, mean: list[float],
                  std: list[float]) -> None:
    if init.dim() != 4 or labels.shape != (init.shape[0],):
        raise ValueError(
            f"recover: init must be [B, C, H, W] with one label each, got init "
            f"{tuple(init.shape)} and labels {tuple(labels.shape)}"
        )
    if len(mean) != init.shape[1] or len(std) != init.shape[1]:
        raise ValueError(
            f"recover: init has {init.shape[1]} channels but mean/std have "
            f"{len(mean)}/{len(std)} values"
        )


@dataclass
class _Loop:
    """The state one recover run carries from iteration to iteration."""

    cfg: RecoverConfig
    nets: list[nn.Module]
    bn_losses: list[BNStatLoss]
    labels: torch.Tensor
    bounds: tuple[torch.Tensor, torch.Tensor]
    generators: list[torch.Generator]
    """One per group (a group = one image per class, one unit's problem)."""
    scaler: torch.amp.GradScaler
    device: torch.device
    total: int
    log: torch.Tensor
    """Every iteration's loss, kept on the device (checked for finiteness now and then,
    so the loop does not wait for the device every iteration)."""
    progress: Callable[[int, int], None] | None
    precision: str = "bf16"
    step: int = 0
    checked: int = 0
    axes: torch.Tensor | None = None
    """The current stage's augmentation grids ``[iterations, 2, B, size]`` on the device,
    drawn when the stage starts (one host-to-device copy per stage, not per iteration)."""


def recover(
    init: torch.Tensor,
    labels: torch.Tensor,
    teachers: list[nn.Module],
    cfg: RecoverConfig,
    mean: list[float],
    std: list[float],
    image_size: int,
    seed: int | Sequence[int],
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
    residual_source: torch.Tensor | None = None,
    on_stage_end: StageHook | None = None,
    precision: str = "bf16",
) -> RecoverResult:
    """Optimise the pixels of ``init`` (normalised fp32 ``[B, C, H, W]``) for ``labels``.

    Teachers must already be on ``device``; they are frozen and in eval mode while this runs
    (their state is restored afterwards) and are used round-robin, one per iteration.
    ``residual_source`` is P for ARC (default: ``init``). ``on_stage_end(stage, before,
    after)`` is called at the end of every stage with detached copies of x before and after
    the residual step (equal tensors where no residual applies). Deterministic for a seed
    on the CPU. ``precision`` is the autocast dtype (:mod:`fadrm.amp`) when the method
    uses mixed precision.

    Several problems in one forward (``recover.ipc_per_forward``): with ``seed`` a list of
    G seeds, ``init`` holds G groups of ``B / G`` images (group-major), each optimised as
    its own run with that seed would be: its own augmentation draws, its own BN-statistics
    term, its own per-sample CE mean; Adam and the clamp are element-wise. The summed loss
    gives each group the gradient of its own loss (up to float rounding of the larger
    convolutions); ``losses`` holds the sums and ``group_losses`` each group's. The one
    exception: with an fp16 GradScaler an overflow in one group skips the step for all.

    The steady state reads nothing from the device: the augmentation of a whole stage is
    drawn at its start, Adam keeps its step count on the host (fused on CUDA, GradScaler
    included), and the losses stay on the device, checked for finiteness every
    ``_PROGRESS_EVERY`` iterations.
    """
    spec = cfg.spec
    _check_inputs(init, labels, mean, std)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    groups = len(seeds)
    if groups < 1 or init.shape[0] % groups:
        raise ValueError(f"recover: {init.shape[0]} images do not split into {groups} groups")
    if not spec.optimize:
        return RecoverResult(images=init.detach().float().cpu().clone())
    if not teachers:
        raise ValueError(f"recover: method {cfg.method!r} needs at least one teacher")

    tune_for_fixed_shapes(device)
    stages = _stages(cfg, image_size)
    total = sum(n for _, n in stages)
    source = (init if residual_source is None else residual_source).detach().to(device).float()
    bn_losses = [BNStatLoss(t, cfg.first_bn_multiplier, groups) for t in teachers]
    x = init.detach().to(device, torch.float32)
    with _frozen(teachers), channels_last_models(teachers, cfg.channels_last), \
            contextlib.ExitStack() as hooks:
        if cfg.r_bn > 0:
            for bn in bn_losses:
                hooks.enter_context(bn)
        # Compiled after the hooks are attached, so the compiled graphs include them.
        nets = [_compiled(t) for t in teachers] if cfg.compile else list(teachers)
        loop = _Loop(cfg, nets, bn_losses, labels.to(device, torch.long),
                     tuple(b.to(device) for b in pixel_bounds(mean, std)),
                     [torch.Generator().manual_seed(s) for s in seeds],
                     grad_scaler(device, spec.mixed_precision, precision), device, total,
                     torch.zeros((total,) if groups == 1 else (total, groups), device=device),
                     progress, precision)
        for stage, (resolution, iterations) in enumerate(stages):
            x = _run_stage(loop, x, resolution, iterations)
            following = stages[stage + 1][0] if stage + 1 < len(stages) else None
            x = _residual_step(cfg, x, source, following, stage, on_stage_end)

    _check_finite(loop.log, loop.checked, total)
    if progress is not None and total == 0:
        progress(0, 0)
    images = resample(x.detach(), image_size).float().cpu().clone()
    log = loop.log.cpu()
    return RecoverResult(
        images=images,
        losses=(log if groups == 1 else log.sum(1)).tolist(),
        stage_resolutions=[r for r, _ in stages],
        group_losses=[log.tolist()] if groups == 1 else log.T.tolist(),
    )


def _run_stage(loop: _Loop, x: torch.Tensor, resolution: int, iterations: int) -> torch.Tensor:
    """One MRO stage: x at ``resolution`` with a fresh Adam, ``iterations`` steps of the one
    cosine schedule that spans all stages."""
    cfg = loop.cfg
    x = resample(x.detach(), resolution).clone().requires_grad_(True)
    opt = adam([x], loop.device, cfg.lr, (cfg.betas[0], cfg.betas[1]))
    per_group = x.shape[0] // len(loop.generators)
    axes = torch.cat([augment_axes(per_group, x.shape[2], x.shape[3], resolution,
                                   cfg.crop_scale, cfg.flip, cfg.jitter, g, iterations)
                      for g in loop.generators], dim=2)
    if loop.device.type == "cuda":
        axes = axes.pin_memory()
    loop.axes = axes.to(loop.device, x.dtype, non_blocking=True)
    for grid_axes in stage_grids(loop.axes):
        _iteration(loop, x, opt, grid_axes)
    loop.axes = None
    return x


def _iteration(loop: _Loop, x: torch.Tensor, opt: torch.optim.Optimizer,
               grid_axes: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One step: augment, teacher ``step mod K`` (FADRM+ round-robin), CE + BN loss,
    Adam, clamp x to valid pixels."""
    cfg = loop.cfg
    for group in opt.param_groups:
        group["lr"] = cosine_lr(cfg.lr, loop.step, loop.total)
    k = loop.step % len(loop.nets)
    view = to_layout(sample_grid(x, *grid_axes), cfg.channels_last)
    with autocast(loop.device, cfg.spec.mixed_precision, loop.precision):
        logits = loop.nets[k](view)
    groups = len(loop.generators)
    if groups == 1:
        loss = F.cross_entropy(logits.float(), loop.labels)
    else:  # each group's own CE mean
        loss = F.cross_entropy(logits.float(), loop.labels, reduction="none")
        loss = loss.view(groups, -1).mean(1)
    if cfg.r_bn > 0 and loop.bn_losses[k].num_layers:
        loss = loss + cfg.r_bn * loop.bn_losses[k].loss()
    opt.zero_grad(set_to_none=True)
    loop.scaler.scale(loss if groups == 1 else loss.sum()).backward()
    loop.scaler.step(opt)
    loop.scaler.update()
    with torch.no_grad():
        x.clamp_(*loop.bounds)
        loop.log[loop.step] = loss
    loop.step += 1
    if loop.step % _PROGRESS_EVERY == 0 or loop.step == loop.total:
        _check_finite(loop.log, loop.checked, loop.step)
        loop.checked = loop.step
        if loop.progress is not None:
            loop.progress(loop.step, loop.total)


@torch.no_grad()
def _residual_step(cfg: RecoverConfig, x: torch.Tensor, source: torch.Tensor,
                   following: int | None, stage: int,
                   on_stage_end: StageHook | None) -> torch.Tensor:
    """ARC at an inner stage boundary, in the reference's order: x is resized to the next
    stage's resolution first, then ``x <- alpha x + (1 - alpha) resample(P)`` with P resized
    straight from full resolution (so P never passes through a smaller stage)."""
    before = x.detach()
    after = before
    if cfg.spec.residual and following is not None:
        after = (cfg.alpha * resample(before, following)
                 + (1 - cfg.alpha) * resample(source, following))
    if on_stage_end is not None:
        on_stage_end(stage, before.clone(), after.clone())
    return after
