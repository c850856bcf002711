"""Mixed precision that works the same on CPU and CUDA.

CPU: bf16 autocast (no scaler needed: bf16 has fp32's exponent range).
CUDA: fp16 autocast + GradScaler. Parameters and optimised pixels stay fp32.
"""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, enabled: bool = True):
    """Autocast context for ``device``; a no-op context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 on CUDA."""
    return torch.amp.GradScaler(device.type, enabled=enabled and device.type == "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from fadrm.errors import DeviceError

        raise DeviceError("execution.device is 'cuda' but no CUDA device is available; set "
                          "execution.device: auto or cpu, or run on a GPU node")
    return torch.device(name)


# --------------------------------------------------------------------------- memory layout
#
# channels_last (NHWC) is the layout oneDNN's CPU convolutions and CUDA tensor cores want:
# 2x faster convolutions for small networks on the CPU, and the batch-norm statistics of
# recover reduce it as a plain [N*H*W, C] matrix. Layout never changes what a network
# computes, only float rounding inside the kernels.


def is_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's 4-d parameters are stored channels_last.

    Decided by the first 4-d parameter whose two layouts differ (a ``[O, 1, k, k]`` or
    ``[O, I, 1, 1]`` kernel is both at once and says nothing).
    """
    for p in model.parameters():
        if p.dim() != 4:
            continue
        nhwc = p.is_contiguous(memory_format=torch.channels_last)
        plain = p.is_contiguous()
        if nhwc != plain:
            return nhwc
    return False


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels_last when asked and it is an image batch ``[N, C, H, W]``."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@contextlib.contextmanager
def channels_last_models(models, enabled: bool = True):
    """Convert ``models`` to channels_last for the block; restore the plain layout after.

    Only models whose 4-d parameters were plain (contiguous) are converted back, so a model
    that already was channels_last stays so. A no-op when ``enabled`` is False.
    """
    models = list(models)
    if not enabled:
        yield models
        return
    restore = [m for m in models if not is_channels_last(m)]
    for m in models:
        m.to(memory_format=torch.channels_last)
    try:
        yield models
    finally:
        for m in restore:
            m.to(memory_format=torch.contiguous_format)
