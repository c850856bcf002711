"""Recover's BN-statistics loss: the distance of each BatchNorm layer's input statistics
from its running statistics, ``m_l * (||mu_l - running_mean_l||_2 + ||var_l -
running_var_l||_2)``, computed in fp32 even under autocast.

Hot-loop code (issue 23): per layer and iteration one autograd node (:class:`_BNTerm`)
whose forward uses the framework's batch-norm kernel for the statistics and whose backward
is the closed form, with autograd's arithmetic op for op (the same bits as the chain of
small ops it replaces); several problems in one batch (``groups``) share one set of ops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["BNStatLoss", "bn_term", "channel_stats"]


@functools.lru_cache(maxsize=64)
def _unit_affine(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 unit weight and zero bias for the statistics kernel, made once per shape and
    device instead of twice per layer and iteration (never written to)."""
    unit = torch.ones(channels, device=device, dtype=torch.float32)
    return unit, torch.zeros_like(unit)


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``[N, C, ...]`` in fp32, no autograd.

    From the framework's own training-mode batch-norm kernel (``torch.native_batch_norm``
    with fp32 unit weights: fp32 accumulation, any layout, bf16/fp16 inputs read directly),
    which is several times faster on the CPU than ``torch.var_mean(x.float(), dim=(0, 2,
    3))``; its normalised output is discarded.
    """
    unit, zero = _unit_affine(x.shape[1], x.device)
    with torch.autocast(x.device.type, enabled=False):
        _, mean, invstd = torch.native_batch_norm(x, unit, zero, None, None, True, 0.0, 0.0)
    mean, invstd = mean.float(), invstd.float()
    # eps 0: the kernel reports invstd 0 (CPU) or inf (CUDA) for a constant channel, NaN for
    # a NaN input: the variance is then 0. (invstd is never negative, and 1 / invstd never
    # overflows: the same values as where(invstd > 0, 1 / invstd**2, 0), in fewer ops.)
    var = torch.nan_to_num(invstd.reciprocal(), nan=0.0, posinf=0.0, neginf=0.0).square()
    return mean, var


def _grouped_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance ``[G, C]`` of each of ``groups`` equal parts of ``x`` along N.

    A channels_last batch is folded into one ``[N/G * H * W, G * C]`` matrix (a copy), so
    one kernel call gives every group's statistics: the channels_last kernel reduces each
    column over the same rows as it would for that part alone. Other layouts: one call per
    part."""
    c = x.shape[1]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        folded = x.permute(0, 2, 3, 1).reshape(groups, -1, c).transpose(0, 1)
        mean, var = _batch_stats(folded.reshape(-1, groups * c))
        return mean.view(groups, c), var.view(groups, c)
    stats = [_batch_stats(part) for part in x.chunk(groups)]
    return torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats])


def _stats_backward(x: torch.Tensor, mean: torch.Tensor, g_mean: torch.Tensor,
                    g_var: torch.Tensor, groups: int) -> torch.Tensor:
    """``dL/dx = g_mean / M + 2 g_var (x - mean) / M`` (``M`` = elements per channel and
    group) as one fused pass, in fp32 and rounded once to the input's dtype, instead of
    autograd's chain through ``var_mean``. ``mean``, ``g_*``: ``[C]``, or ``[G, C]`` for
    ``groups`` equal parts of ``x`` along N."""
    m = x.numel() // max(x.shape[1] * groups, 1)
    if groups > 1:  # [G*B, C, ...] as [G, B, C, ...]: each part against its own mean
        shape = (groups, 1, x.shape[1], *([1] * (x.dim() - 2)))
        xs = x.unflatten(0, (groups, -1))
    else:
        shape = (1, x.shape[1], *([1] * (x.dim() - 2)))
        xs = x
    b_flat = 2.0 * g_var.float() / m
    b = b_flat.view(shape)
    with torch.autocast(x.device.type, enabled=False):
        if x.dtype == torch.float32 or x.dtype == torch.float64:
            a = g_mean.float().view(shape) / m - b * mean.view(shape)
            out = torch.addcmul(a.to(x.dtype), xs, b.to(x.dtype))
        else:
            # Half precision: b (x - mean) + g / M in the input's dtype (an fp32
            # temporary would cost 10x more on the CPU). Subtracting the rounded mean
            # first keeps the large terms from cancelling; the rounding residual goes
            # into the (small) constant.
            low = mean.to(x.dtype)
            c = g_mean.float() / m - b_flat * (mean - low)  # low promoted to fp32: exact
            centred = xs - low.view(shape)
            out = torch.addcmul(c.to(x.dtype).view(shape), centred, b.to(x.dtype))
    return out if groups == 1 else out.flatten(0, 1)


class _ChannelStats(torch.autograd.Function):
    """Per-channel ``(mean(x) - shift, biased var(x))`` of ``[N, C, ...]`` in fp32: the
    statistics of :func:`_batch_stats`, the gradient of :func:`_stats_backward`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor):  # type: ignore[override]
        mean, var = _batch_stats(x)
        ctx.save_for_backward(x, mean)
        return mean - shift.float(), var

    @staticmethod
    def backward(ctx, g_offset: torch.Tensor, g_var: torch.Tensor):  # type: ignore[override]
        x, mean = ctx.saved_tensors
        return _stats_backward(x, mean, g_offset, g_var, 1), None


def channel_stats(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean - shift, biased variance)`` over (N, H, W) of ``x``, fp32, differentiable.

    The same values as ``torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)`` (up to
    fp32 rounding), several times faster forward and backward on the CPU.
    """
    if x.dim() < 2:
        raise ValueError(f"channel_stats needs [N, C, ...], got {tuple(x.shape)}")
    return _ChannelStats.apply(x, shift)


def _norm_backward(grad: torch.Tensor, v: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The gradient of the 2-norm as autograd computes it (``grad * (v / norm)``, 0 where the
    norm is 0), op for op, so the fused term below gives autograd's bits."""
    return grad * (v / norm).masked_fill_(norm == 0, 0)


class _BNTerm(torch.autograd.Function):
    """One BN layer's term ``w * (||mean - running_mean|| + ||var - running_var||)``, per
    group (``[G]``) when the batch holds ``groups`` problems, else a scalar.

    The same arithmetic as :func:`channel_stats` followed by autograd through the norms,
    op for op (the same bits), in one autograd node: no saved-tensor bookkeeping per
    intermediate, no graph of a dozen small nodes per layer and iteration. Several groups
    are handled by one set of ops (:func:`_grouped_stats`), not one set per group.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, running_mean: torch.Tensor,  # type: ignore[override]
                running_var: torch.Tensor, weight: float, groups: int):
        mean, var = _batch_stats(x) if groups == 1 else _grouped_stats(x, groups)
        offset = mean - running_mean.float()
        spread = var - running_var
        dim = None if groups == 1 else -1  # one problem: the 2-norm of the whole vector
        n_offset = torch.linalg.vector_norm(offset, dim=dim)
        n_spread = torch.linalg.vector_norm(spread, dim=dim)
        term = n_offset + n_spread
        ctx.save_for_backward(x, mean, offset, spread, n_offset, n_spread)
        ctx.weight, ctx.groups = weight, groups
        return term * weight if weight != 1.0 else term

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, mean, offset, spread, n_offset, n_spread = ctx.saved_tensors
        if ctx.weight != 1.0:
            grad = grad * ctx.weight
        if ctx.groups > 1:  # [G] against [G, C]
            grad, n_offset, n_spread = grad[:, None], n_offset[:, None], n_spread[:, None]
        g_mean = _norm_backward(grad, offset, n_offset)
        g_var = _norm_backward(grad, spread, n_spread)
        return _stats_backward(x, mean, g_mean, g_var, ctx.groups), None, None, None, None


def bn_term(x: torch.Tensor, layer: nn.BatchNorm2d, weight: float,
            groups: int = 1) -> torch.Tensor:
    """``weight * (||mean - running_mean||_2 + ||var - running_var||_2)`` of ``x`` (the
    layer's input): a scalar, or ``[groups]`` for ``groups`` equal parts of ``x`` along N."""
    if x.dim() < 2:
        raise ValueError(f"bn_term needs [N, C, ...], got {tuple(x.shape)}")
    return _BNTerm.apply(x, layer.running_mean, layer.running_var, float(weight), groups)


class BNStatLoss:
    """Distance of BatchNorm input statistics from the layers' running statistics.

    Forward hooks on every ``nn.BatchNorm2d`` (module order) record, for the last forward,
    ``m_l * (||mean - running_mean||_2 + ||var - running_var||_2)`` where mean and biased
    variance are taken over (N, H, W) of the layer's *input*, in fp32 even under autocast.
    ``m_l`` is ``first_multiplier`` for the first BN layer and 1 for the rest. Use as a
    context manager or with :meth:`attach` / :meth:`remove`.
    """

    def __init__(self, model: nn.Module, first_multiplier: float = 10.0, groups: int = 1):
        self.model = model
        self.first_multiplier = float(first_multiplier)
        self.groups = groups
        """Independent problems in one batch (``groups`` equal, contiguous parts): each
        part's statistics are matched on their own and :meth:`loss` is per part ``[G]``."""
        # A BN layer without running statistics has no target to match: skipped.
        self.layers = [
            m for m in model.modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
        ]
        self._terms: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attach(self) -> BNStatLoss:
        if self._handles:
            return self
        # A pre-hook on the whole model clears the previous forward's terms.
        self._handles.append(self.model.register_forward_pre_hook(self._reset))
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(index)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> BNStatLoss:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _reset(self, *_: object) -> None:
        self._terms = [None] * len(self.layers)

    def _hook(self, index: int) -> Callable:
        weight = self.first_multiplier if index == 0 else 1.0

        def hook(module: nn.BatchNorm2d, inputs: tuple, _output: object) -> None:
            # Groups: a part of a batch along N is itself a batch in the same layout; each
            # part's statistics are those of a forward of that part alone.
            self._terms[index] = bn_term(inputs[0], module, weight, self.groups)

        return hook

    def terms(self) -> list[torch.Tensor]:
        """Weighted per-layer terms of the last forward (layers that ran, module order)."""
        return [t for t in self._terms if t is not None]

    def loss(self) -> torch.Tensor:
        """Sum of the weighted terms of the last forward; 0 for a teacher without BN."""
        terms = self.terms()
        if not terms:
            if self.groups == 1:
                return torch.zeros(())
            # Per group: a [G] tensor must live on the model's device to be added.
            device = next((p.device for p in self.model.parameters()), None)
            return torch.zeros(self.groups, device=device)
        if self.groups == 1:
            return torch.stack(terms).sum()
        return torch.stack(terms).sum(0)
