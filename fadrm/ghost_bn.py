"""Ghost batch norm: many BN batches in one forward, each normalised by its own statistics.

Relabel labels each stored batch with the teachers' BatchNorm in training mode, in
``bn_splits`` parts (the reference's halves): every part is normalised by its own batch
statistics. Labelling many stored batches per forward keeps that objective when each
training-mode BN layer computes mean and (biased) variance per part of the concatenated
batch, which :func:`ghost_batch_norm` does: same labels up to float rounding, fewer and
larger launches. Eval-mode layers (running statistics) are per sample anyway and untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["ghost_batch_norm"]


def _ghost_forward(module: nn.modules.batchnorm._BatchNorm, sizes: list[int], original):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not module.training or module.track_running_stats:
            # Running statistics in use (or being updated): not a labelling forward.
            return original(x)
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"ghost batch norm: parts {sizes} do not add up to the batch "
                             f"of {x.shape[0]}")
        dims = [0, *range(2, x.dim())]
        shape = (1, -1, *([1] * (x.dim() - 2)))
        xf = x.float()
        outs = []
        # Equal parts reduce in one call over a [G, b, ...] view; otherwise part by part.
        if len(set(sizes)) == 1:
            groups = xf.view(len(sizes), sizes[0], *x.shape[1:])
            var, mean = torch.var_mean(groups, dim=[d + 1 for d in dims], correction=0,
                                       keepdim=True)
            y = (groups - mean) * torch.rsqrt(var + module.eps)
            y = y.view_as(xf)
        else:
            for part in xf.split(sizes):
                var, mean = torch.var_mean(part, dim=dims, correction=0, keepdim=True)
                outs.append((part - mean) * torch.rsqrt(var + module.eps))
            y = torch.cat(outs)
        if module.affine:
            y = y * module.weight.float().view(shape) + module.bias.float().view(shape)
        return y.to(x.dtype)

    return forward


@contextlib.contextmanager
def ghost_batch_norm(models: Sequence[nn.Module], sizes: Sequence[int]) -> Iterator[None]:
    """Within the block, every BatchNorm layer of ``models`` that runs in training mode
    without running statistics (relabel's 'train' BN mode) normalises each of the
    contiguous parts ``sizes`` of its input batch by that part's own statistics."""
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"ghost batch norm needs positive part sizes, got {sizes}")
    patched: dict[int, tuple[nn.Module, object]] = {}
    try:
        for model in models:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in patched:
                    patched[id(m)] = (m, m.__dict__.get("forward"))
                    m.forward = _ghost_forward(m, sizes, m.forward)  # instance attribute
        yield
    finally:
        for m, own in patched.values():
            if own is None:
                del m.forward  # the class's forward again
            else:
                m.forward = own
