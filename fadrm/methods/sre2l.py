"""SRe2L: Gaussian noise optimised against one teacher (CE + BN statistics), fp32, one
resolution, no residual."""

from __future__ import annotations

from fadrm.methods.inits import NoiseInit
from fadrm.methods.registry import register_method

__all__ = ["SRe2L"]


@register_method
class SRe2L(NoiseInit):
    name = "sre2l"
    summary = "noise + fp32 optimisation"
    optimize = True
