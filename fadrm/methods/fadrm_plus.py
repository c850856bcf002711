"""FADRM+: FADRM with every recover teacher, used round-robin (one per iteration)."""

from __future__ import annotations

from fadrm.methods.fadrm import FADRM
from fadrm.methods.registry import register_method

__all__ = ["FADRMPlus"]


@register_method
class FADRMPlus(FADRM):
    name = "fadrm+"
    summary = "fadrm with round-robin teachers"
    multi_teacher = True
