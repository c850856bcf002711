"""Images in memory: ``ImageSet``, normalisation, and the channel and size conversions
every data kind applies after reading."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fadrm.config import DataConfig
from fadrm.errors import InputError

Progress = Callable[[int, int], None]


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

    def class_size(self, label: int) -> int:
        return int((self.labels == label).sum())

    def class_images(self, label: int, order: Sequence[int], count: int) -> torch.Tensor:
        """``count`` images of class ``label``: its images at positions ``order[:count]``."""
        pool = self.indices_of(label)
        return self.images[pool[torch.as_tensor(list(order)[:count], dtype=torch.long)]]

    def class_originals(self, label: int, order: Sequence[int],
                        count: int) -> list[torch.Tensor]:
        """:meth:`class_images` as a list of ``[C, H, W]`` (an in-memory set is held at
        one size: its originals are its images)."""
        return list(self.class_images(label, order, count))


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


class DataError(InputError):
    """The data set on disk is not usable (empty class, class mismatch, malformed file)."""

_RESIZE_CHUNK = 4096  # images per interpolate call: bounds the float32 working memory


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> ``channels`` channels (gray replicated, or RGB -> luma)."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        # ITU-R 601 luma, the same weights PIL uses for mode "L".
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {have}-channel images to {channels} channels")


def eval_resize_shape(height: int, width: int, short: int) -> tuple[int, int]:
    """(H, W) after torchvision's ``Resize(short)``: the shorter side becomes ``short``, the
    longer one ``int(short * long / short_side)`` (truncated, as torchvision does)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(size)`` (its rounding, not floor)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_images(images: torch.Tensor, size: int,
                  crop_ratio: float | None = None) -> torch.Tensor:
    """uint8 [N, C, H, W] -> [N, C, size, size]: shorter side to ``size``, centre crop;
    with ``crop_ratio`` r, shorter side to round(size / r) first (torchvision's evaluation
    transform, see ``DataConfig.val_crop_ratio``).

    Bilinear with antialiasing, so downscaling does not alias.
    """
    n, c, h, w = images.shape
    if crop_ratio is None:
        if h == size and w == size:
            return images
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        top, left = (new_h - size) // 2, (new_w - size) // 2
    else:
        new_h, new_w = eval_resize_shape(h, w, round(size / crop_ratio))
        top, left = center_offsets(new_h, new_w, size)
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, _RESIZE_CHUNK):
        x = images[start : start + _RESIZE_CHUNK].float()
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True,
                          align_corners=False)
        x = x[:, :, top : top + size, left : left + size]
        out[start : start + _RESIZE_CHUNK] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def _finish(data: ImageSet, cfg: DataConfig, crop_ratio: float | None = None) -> ImageSet:
    """Convert channels and resolution to what the config asks for."""
    images = resize_images(convert_channels(data.images, cfg.channels), cfg.resolution,
                           crop_ratio)
    return ImageSet(images, data.labels, data.classes, data.skipped)
