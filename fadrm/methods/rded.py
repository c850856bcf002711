"""RDED: realism-scored patches of real images, no pixel optimisation."""

from __future__ import annotations

from fadrm.methods.inits import PatchesInit
from fadrm.methods.registry import register_method

__all__ = ["RDED"]


@register_method
class RDED(PatchesInit):
    name = "rded"
    summary = "realism-selected patches, no optimisation"
