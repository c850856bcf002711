"""FADRM: realism-selected patches optimised with data residual matching: multi-resolution
stages (MRO), the adjustable residual connection (ARC) and mixed precision."""

from __future__ import annotations

from fadrm.methods.inits import PatchesInit
from fadrm.methods.registry import register_method

__all__ = ["FADRM"]


@register_method
class FADRM(PatchesInit):
    name = "fadrm"
    summary = "patches + MRO / ARC / mixed precision"
    optimize = True
    residual = True
    multi_resolution = True
    mixed_precision = True
