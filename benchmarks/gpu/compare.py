"""What the CUDA checks compare and how: strict fp32, tolerances that name what differed, and
the seeded models and images they compare on (see :mod:`benchmarks.gpu.cuda_checks`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from benchmarks.gpu.common import MEAN, STD


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls without TF32 while the block runs (restored after)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- comparisons


def _as_tensor(value: torch.Tensor | Sequence[float] | float) -> torch.Tensor:
    return torch.as_tensor(value).detach().cpu().double()


def assert_close(what: str, actual, expected, rtol: float, atol: float = 0.0) -> None:
    """Every element within ``atol + rtol * |expected|``; else AssertionError naming ``what``."""
    a, e = _as_tensor(actual), _as_tensor(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise AssertionError(f"{what}: non-finite values on the tested device")
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    if bool((diff > bound).any()):
        worst = int((diff - bound).argmax())
        raise AssertionError(
            f"{what}: {int((diff > bound).sum())} of {diff.numel()} values differ beyond "
            f"atol {atol:g} + rtol {rtol:g}; worst {a.flatten()[worst].item():.6g} vs "
            f"{e.flatten()[worst].item():.6g} (|diff| {diff.flatten()[worst].item():.3g})"
        )


def assert_update_close(what: str, after, reference, before, rtol: float) -> None:
    """``after - before`` within ``rtol`` (relative L2) of ``reference - before``."""
    a, r, b = _as_tensor(after), _as_tensor(reference), _as_tensor(before)
    if not bool(torch.isfinite(a).all()):
        raise AssertionError(f"{what}: non-finite values on the tested device")
    step = float((r - b).norm())
    if step == 0.0:
        raise AssertionError(f"{what}: the CPU reference did not change at all")
    error = float((a - r).norm()) / step
    if not error <= rtol:
        raise AssertionError(f"{what}: the update differs from the CPU's by {error:.3g} "
                             f"(relative L2; allowed {rtol:g})")


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()
            if v.is_floating_point()}


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters only: BN's running statistics move on every forward, even
    when a GradScaler skipped every step, so "the weights moved" must not count them."""
    return {k: p.detach().float().cpu().clone() for k, p in model.named_parameters()}


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for v in state.values()])


# --------------------------------------------------------------------------- fixtures


def resnet18(num_classes: int, seed: int) -> nn.Module:
    """A seeded torchvision ResNet-18 with the small-image stem (32 px inputs)."""
    from fadrm.models import create_model

    torch.manual_seed(seed)
    return create_model("torchvision:resnet18", num_classes, 3, 32)


def convnet(num_classes: int, seed: int) -> nn.Module:
    """A seeded built-in ConvNet (3 x conv-BN-ReLU-pool) with calibrated BN statistics."""
    from fadrm.models import ConvNet

    torch.manual_seed(seed)
    return calibrate_bn(ConvNet(num_classes, 3, 32), seed)


def calibrate_bn(model: nn.Module, seed: int, size: int = 32) -> nn.Module:
    """Give the BN layers non-trivial running statistics (a few train-mode passes)."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size, generator=gen) * 1.5 + 0.3)
    return model.eval()


def pixels(n: int, size: int, seed: int) -> torch.Tensor:
    """Normalised float images inside the valid pixel range, ``[n, 3, size, size]``."""
    from fadrm.data import normalize

    return normalize(uint8_images(n, size, seed), MEAN, STD)


def uint8_images(n: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
