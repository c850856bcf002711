"""Random real images: the floor every method must beat (no teacher, no optimisation).

Two entries: ``random-real`` (soft labels from the teachers, like every method) and its
variant ``random-real-hard`` (the same images with hard labels: cross-entropy to the
CutMix-mixed one-hot class of each stored view), which the benchmarks measure as well.
"""

from __future__ import annotations

from fadrm.methods.inits import RandomRealInit
from fadrm.methods.registry import register_method

__all__ = ["RandomReal", "RandomRealHard"]


class _RandomReal(RandomRealInit):
    summary = "random real images, no optimisation"


@register_method
class RandomRealHard(_RandomReal):
    """Random real images with hard labels (a variant: runs as ``random-real``)."""

    name = "random-real-hard"
    summary = "random real images, hard labels"
    runs_as = "random-real"
    label_mode = "hard"


@register_method
class RandomReal(_RandomReal):
    """Random real images with soft labels."""

    name = "random-real"
