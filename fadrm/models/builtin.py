"""The built-in networks (small-image ones the usual libraries lack) and their registry."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# (num_classes, in_chans, image_size) -> model
ModelFactory = Callable[[int, int, int], nn.Module]

_BUILTIN: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make ``factory(num_classes, in_chans, image_size)`` available by ``name``."""

    def deco(factory: ModelFactory) -> ModelFactory:
        if name in _BUILTIN:
            raise ValueError(f"model {name!r} is already registered")
        _BUILTIN[name] = factory
        return factory

    return deco


def builtin_models() -> list[str]:
    """Names of the built-in models."""
    return sorted(_BUILTIN)


_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    # One group per channel: instance norm with affine parameters (no running statistics).
    "instance": lambda c: nn.GroupNorm(c, c),
    "none": lambda c: nn.Identity(),
}


class ConvNet(nn.Module):
    """The data-distillation ConvNet: ``depth`` x [conv3x3 - norm - ReLU - avgpool2], linear.

    The classifier expects the spatial size that ``image_size`` leaves after ``depth``
    halvings; other input sizes (>= 2**depth) are average-pooled to it.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, image_size: int = 32,
                 width: int = 64, depth: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"ConvNet norm {norm!r} unknown; choose from {sorted(_NORMS)}")
        layers: list[nn.Module] = []
        channels = in_chans
        for _ in range(depth):
            layers += [
                # A bias is redundant before a norm layer that re-centres.
                nn.Conv2d(channels, width, 3, padding=1, bias=norm == "none"),
                _NORMS[norm](width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.feature_size = max(1, image_size // 2**depth)
        self.pool = nn.AdaptiveAvgPool2d(self.feature_size)
        self.classifier = nn.Linear(width * self.feature_size**2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("convnet")
def _convnet(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    return ConvNet(num_classes, in_chans, image_size, width=64)


@register_model("convnet_w128")
def _convnet_w128(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    return ConvNet(num_classes, in_chans, image_size, width=128)


@register_model("convnet_nobn")
def _convnet_nobn(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    # Instance norm instead of BatchNorm: a teacher without BN statistics to match.
    return ConvNet(num_classes, in_chans, image_size, width=64, norm="instance")
