"""The recover loop as it ran before issue 23 (main 4739ba0): the "before" of the speed part.

Today's :func:`fadrm.synthesis.recover` draws a stage's augmentation at once, keeps Adam's
step count on the host (fused Adam on CUDA), runs bf16 without a scaler and may put several
IPC indices in one forward. The loop here does what the old one did, step for step, so the
speed part can time a fair "before" in the same run:

* fp16 autocast + ``GradScaler`` on CUDA (bf16, no scaler, on the CPU);
* ``torch.optim.Adam`` with torch's default implementation (foreach on CUDA, its step
  count a tensor; the scaler's ``step`` reads ``found_inf`` on the host every iteration);
* the augmentation drawn every iteration on the CPU and its two grid axes copied to the
  device one by one (blocking copies from pageable memory);
* the BN-statistics term as a chain of small autograd nodes per layer (statistics, two
  norms, their sum), where today's :mod:`fadrm.bn_stats` fuses them into one node;
* eager, ``cudnn.benchmark`` off, one class block (one image per class) per forward.

The objective and every random draw are today's (CE, the cosine schedule, ARC and the
clamp come from :mod:`fadrm.synthesis`; the fused term gives the chain's bits), so on the
CPU this loop gives today's bytes (a test checks it) and on a GPU the same images within
float rounding: only the speed differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fadrm.amp import autocast, channels_last_models, grad_scaler, to_layout
from fadrm.augment import augment_axes
from fadrm.config import RecoverConfig
from fadrm.data import pixel_bounds
from fadrm.synthesis import (_check_finite, _frozen, _residual_step, _stages, channel_stats,
                             cosine_lr, resample)

OLD_PRECISION = "fp16"
"""The old loops' precision: fp16 + GradScaler on CUDA, bf16 on the CPU."""
_CHECK_EVERY = 10  # the old loop read its loss log for finiteness every 10 iterations too


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """The old loop never set ``cudnn.benchmark``; today's sets it once per process."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


class _OldBNLoss:
    """The old BN hooks: per layer, ``channel_stats`` and two norms through autograd."""

    def __init__(self, model: nn.Module, first_multiplier: float):
        self.model, self.first = model, float(first_multiplier)
        self.layers = [m for m in model.modules()
                       if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
        self.terms: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> _OldBNLoss:
        self.handles.append(self.model.register_forward_pre_hook(
            lambda *_: self.terms.clear()))
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, index: int):
        weight = self.first if index == 0 else 1.0

        def hook(module: nn.BatchNorm2d, inputs: tuple, _output: object) -> None:
            mean_offset, var = channel_stats(inputs[0], module.running_mean)
            term = torch.linalg.vector_norm(mean_offset)
            term = term + torch.linalg.vector_norm(var - module.running_var)
            self.terms[index] = term * weight if weight != 1.0 else term
        return hook

    def loss(self) -> torch.Tensor:
        return torch.stack([self.terms[i] for i in sorted(self.terms)]).sum()


def _old_augment(x: torch.Tensor, size: int, cfg: RecoverConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """One iteration's crop + flip + shift: drawn on the CPU now, each grid axis copied to
    the device on its own (the old ``augment``; the draws and values are today's)."""
    batch = x.shape[0]
    axes = augment_axes(batch, x.shape[2], x.shape[3], size, cfg.crop_scale, cfg.flip,
                        cfg.jitter, generator, 1)[0]
    gx, gy = axes[0].to(x.device, x.dtype), axes[1].to(x.device, x.dtype)
    grid = torch.stack(
        [gx[:, None, :].expand(batch, size, size), gy[:, :, None].expand(batch, size, size)],
        dim=-1,
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def legacy_recover(init: torch.Tensor, labels: torch.Tensor, teachers: list[nn.Module],
                   cfg: RecoverConfig, mean: list[float], std: list[float], image_size: int,
                   seed: int, device: torch.device) -> torch.Tensor:
    """The old recover of one class block (``init`` normalised fp32 ``[B, C, H, W]``, teachers
    on ``device``, used round-robin); returns the images at ``image_size`` on the CPU."""
    if not teachers:
        raise ValueError("legacy_recover needs at least one teacher")
    stages = _stages(cfg, image_size)
    total = sum(n for _, n in stages)
    source = init.detach().to(device).float()
    x = init.detach().to(device, torch.float32)
    labels = labels.to(device, torch.long)
    bounds = tuple(b.to(device) for b in pixel_bounds(mean, std))
    generator = torch.Generator().manual_seed(seed)
    mixed = cfg.spec.mixed_precision
    scaler = grad_scaler(device, mixed, OLD_PRECISION)
    bn_losses = [_OldBNLoss(t, cfg.first_bn_multiplier) for t in teachers]
    log = torch.zeros(total, device=device)
    step = checked = 0
    with _frozen(teachers), channels_last_models(teachers, cfg.channels_last), \
            _cudnn_benchmark(False), contextlib.ExitStack() as hooks:
        if cfg.r_bn > 0:
            for bn in bn_losses:
                hooks.enter_context(bn)
        for stage, (resolution, iterations) in enumerate(stages):
            x = resample(x.detach(), resolution).clone().requires_grad_(True)
            opt = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))
            for _ in range(iterations):
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(cfg.lr, step, total)
                k = step % len(teachers)
                view = to_layout(_old_augment(x, resolution, cfg, generator), cfg.channels_last)
                with autocast(device, mixed, OLD_PRECISION):
                    logits = teachers[k](view)
                loss = F.cross_entropy(logits.float(), labels)
                if cfg.r_bn > 0 and bn_losses[k].layers:
                    loss = loss + cfg.r_bn * bn_losses[k].loss()
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                with torch.no_grad():
                    x.clamp_(*bounds)
                log[step] = loss.detach()
                step += 1
                if step % _CHECK_EVERY == 0 or step == total:
                    _check_finite(log, checked, step)
                    checked = step
            following = stages[stage + 1][0] if stage + 1 < len(stages) else None
            x = _residual_step(cfg, x, source, following, stage, None)
    return resample(x.detach(), image_size).float().cpu().clone()
