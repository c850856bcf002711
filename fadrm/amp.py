"""Mixed precision that works the same on CPU and CUDA.

``precision`` (``execution.precision``) picks the autocast dtype of the hot loops:

* ``bf16``: bf16 autocast without a scaler (fp32's exponent range: nothing to scale). The
  default: on Hopper-class GPUs bf16 runs at the fp16 tensor-core rate.
* ``fp16``: fp16 autocast + GradScaler on CUDA, the paper's setting (on the CPU, which has
  no fast fp16, it runs as bf16, as before).
* ``fp32``: no autocast.

The CPU always uses bf16 for ``bf16`` and ``fp16``, so both give the CPU's bytes of before.
Parameters and optimised pixels stay fp32. A loop's own ``mixed_precision: false`` (SRe2L's
recover, a student flag) still means fp32 whatever the precision says.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("bf16", "fp16", "fp32")
"""Values of ``execution.precision``."""
DEFAULT_PRECISION = "bf16"
LEGACY_PRECISION = "fp16"
"""What the loops did before precision was a setting: bf16 on the CPU, fp16 + GradScaler on
CUDA (squeeze and evaluation still run so)."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast_dtype(device: torch.device, precision: str = LEGACY_PRECISION,
                   enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype on ``device``; None when the forward runs in fp32."""
    check_precision(precision)
    if not enabled or precision == "fp32":
        return None
    if device.type == "cuda" and precision == "fp16":
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool = True, precision: str = LEGACY_PRECISION):
    """Autocast context for ``device`` and ``precision``; a no-op context for fp32 or when
    disabled."""
    dtype = autocast_dtype(device, precision, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool = True,
                precision: str = LEGACY_PRECISION) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 on CUDA (bf16 needs none)."""
    active = autocast_dtype(device, precision, enabled) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=active)


def tune_for_fixed_shapes(device: torch.device) -> None:
    """On CUDA, let cuDNN time its algorithms once per input shape and keep the fastest
    (the hot loops' shapes are fixed per MRO stage, relabel batch and micro-batch). The
    choice may differ between processes, as float rounding on a GPU already may."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


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
