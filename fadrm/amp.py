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
        raise RuntimeError("execution.device is 'cuda' but no CUDA device is available")
    return torch.device(name)
