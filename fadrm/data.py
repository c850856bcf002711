"""Real datasets: ImageFolder trees and IDX files, decoded to uint8 tensors.

Images are held as ``uint8`` tensors ``[N, C, H, W]`` at the configured resolution (the
compact form; 60k Fashion-MNIST images are 47 MB). Models take normalised float input:
``normalize`` / ``denormalize`` convert, ``pixel_bounds`` gives the valid normalised range
that recover clamps to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ImageSet", "normalize", "denormalize", "pixel_bounds"]


@dataclass
class ImageSet:
    """A labelled image set held in memory."""

    images: torch.Tensor
    """uint8 [N, C, H, W]"""
    labels: torch.Tensor
    """int64 [N]"""
    classes: list[str]
    """Class names; label i is classes[i]."""
    skipped: list[dict] = field(default_factory=list)
    """Inputs that could not be read: {"path": ..., "error": ...}."""

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def indices_of(self, label: int) -> torch.Tensor:
        return torch.nonzero(self.labels == label, as_tuple=False).flatten()


def _stats(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (or [0, 1] float) images -> normalised float32."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    return (x - _stats(mean, x)) / _stats(std, x)


def denormalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalised float -> uint8 images (clamped to the valid range, rounded)."""
    y = x.float() * _stats(std, x) + _stats(mean, x)
    return (y.clamp(0, 1) * 255.0).round().to(torch.uint8)


def pixel_bounds(mean: list[float], std: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised values of pixel 0 and pixel 1, shaped [1, C, 1, 1]."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s
