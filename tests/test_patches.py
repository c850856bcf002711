"""Initial images: realism-scored patch selection, stitching, random real images, noise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fadrm.config import SelectConfig
from fadrm.data import ImageSet, normalize
from fadrm.patches import noise_init, random_real, score_realism, select_patches

torch.set_num_threads(1)

MEAN, STD = [0.5], [0.5]
CPU = torch.device("cpu")


class BrightnessTeacher(nn.Module):
    """Logits (10 b, -10 b) for mean normalised intensity b: class 0 likes bright images,
    class 1 dark ones, so realism is monotone in brightness."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        b = x.mean(dim=(1, 2, 3))
        return torch.stack([10 * b, -10 * b], dim=1)


def constant_images(values: list[list[int]], size: int = 8) -> ImageSet:
    """Class k holds one constant-intensity image per value in values[k]."""
    images, labels = [], []
    for k, vals in enumerate(values):
        for v in vals:
            images.append(torch.full((1, size, size), v, dtype=torch.uint8))
            labels.append(k)
    return ImageSet(torch.stack(images), torch.tensor(labels),
                    [f"c{k}" for k in range(len(values))])


VALUES = [[10, 200, 50, 250, 120, 90, 30, 180, 140], [15, 220, 60, 240, 130, 80, 35, 170]]


def select_cfg(**kw) -> SelectConfig:
    cfg = SelectConfig(**{"num_candidates": 100, "num_crops": 3, "batch_size": 7, **kw})
    cfg.validate("select")
    return cfg


def test_score_realism_is_negative_cross_entropy_at_image_size():
    teacher = BrightnessTeacher().train()
    patches = torch.randn(5, 1, 4, 4)
    labels = torch.tensor([0, 1, 0, 1, 1])
    scores = score_realism(teacher, patches, labels, 8, 2, CPU)
    resized = F.interpolate(patches, size=(8, 8), mode="bilinear", align_corners=False)
    expected = -F.cross_entropy(teacher(resized), labels, reduction="none")
    assert torch.allclose(scores, expected, atol=1e-6)
    assert set(teacher.sizes) == {(8, 8)}
    assert teacher.training  # mode restored


def test_select_keeps_the_most_realistic_patches_in_rank_order():
    train = constant_images(VALUES)
    out = select_patches(BrightnessTeacher(), train, [0, 1], 3, select_cfg(), MEAN, STD, 0, CPU)
    assert out.shape == (2, 3, 1, 8, 8) and out.dtype == torch.uint8
    # Class 0 prefers bright patches, class 1 dark ones: each image is one constant patch.
    assert out[0].flatten(1).unique(dim=1).flatten().tolist() == [250, 200, 180]
    assert out[1].flatten(1).unique(dim=1).flatten().tolist() == [15, 35, 60]


def test_factor_two_stitches_ranked_patches_row_major():
    train = constant_images(VALUES)
    out = select_patches(BrightnessTeacher(), train, [0], 2, select_cfg(factor=2), MEAN, STD,
                         0, CPU)
    ranked = sorted(VALUES[0], reverse=True)
    for k in range(2):
        image = out[0, k, 0]
        quadrants = [image[:4, :4], image[:4, 4:], image[4:, :4], image[4:, 4:]]
        for q, quadrant in enumerate(quadrants):  # TL, TR, BL, BR = ranks 4k .. 4k+3
            assert torch.all(quadrant == ranked[4 * k + q]), (k, q)


def test_each_image_contributes_its_best_crop():
    image = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    image[..., :, :8] = 255  # bright left half, dark right half
    train = ImageSet(image, torch.tensor([0]), ["c0"])
    many = select_cfg(num_crops=30, crop_scale=[0.05, 0.2])
    best = select_patches(BrightnessTeacher(), train, [0], 1, many, MEAN, STD, 0, CPU)
    assert best.float().mean() / 255 > 0.9  # the best of 30 small crops is (nearly) all bright
    worst = select_patches(BrightnessTeacher(), train, [0], 1, many, [0.5], [-0.5], 0, CPU)
    assert worst.float().mean() / 255 < 0.1  # flipping the realism sign picks the dark side


def test_selection_is_deterministic_per_class():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8, generator=gen)
    train = ImageSet(images, torch.arange(30) % 2, ["a", "b"])
    cfg = select_cfg(num_candidates=6, crop_scale=[0.1, 0.6])
    both = select_patches(BrightnessTeacher(), train, [0, 1], 2, cfg, MEAN, STD, 4, CPU)
    alone = select_patches(BrightnessTeacher(), train, [1], 2, cfg, MEAN, STD, 4, CPU)
    assert torch.equal(both[1], alone[0])
    other_seed = select_patches(BrightnessTeacher(), train, [1], 2, cfg, MEAN, STD, 5, CPU)
    assert not torch.equal(other_seed, alone)


def test_select_errors_name_the_short_class():
    train = constant_images([[10, 20, 30, 40, 50], [10, 20]])
    with pytest.raises(ValueError, match=r"class 1 \('c1'\).*needs 4"):
        select_patches(BrightnessTeacher(), train, [0, 1], 1, select_cfg(factor=2), MEAN, STD,
                       0, CPU)
    with pytest.raises(ValueError, match=r"class 0 \('c0'\).*needs 3"):
        select_patches(BrightnessTeacher(), train, [0], 3, select_cfg(num_candidates=2), MEAN,
                       STD, 0, CPU)


def test_random_real_draws_distinct_images_deterministically():
    train = constant_images([list(range(0, 100, 10)), list(range(100, 200, 10))])
    out = random_real(train, [1, 0], 4, seed=3)
    assert out.shape == (2, 4, 1, 8, 8)
    values = out[..., 0, 0, 0]
    assert all(len(set(row.tolist())) == 4 for row in values)  # no replacement
    assert all(v >= 100 for v in values[0].tolist()) and all(v < 100 for v in values[1].tolist())
    assert torch.equal(random_real(train, [0], 4, seed=3)[0], out[1])
    assert not torch.equal(random_real(train, [0], 4, seed=4)[0], out[1])
    with pytest.raises(ValueError, match=r"class 1 \('c1'\) has 10 images"):
        random_real(train, [1], 11, seed=0)


def test_noise_init_is_standard_normal_and_per_class():
    out = noise_init([3, 5], 64, 1, 16, seed=0)
    assert out.shape == (2, 64, 1, 16, 16) and out.dtype == torch.float32
    assert abs(out.mean().item()) < 0.05 and abs(out.std().item() - 1) < 0.05
    assert torch.equal(noise_init([5], 64, 1, 16, seed=0)[0], out[1])
    assert normalize(torch.zeros(1, 1, 1, 1, dtype=torch.uint8), MEAN, STD).item() == -1.0
