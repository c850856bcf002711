"""224-px preprocessing: select cuts its patches from the stored image, validation uses
torchvision's Resize + CenterCrop, and neither changes what small data sets get.

Synthetic ImageFolder trees (PNG, so pixels are exact) are written to ``tmp_path``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fadrm import data as fdata
from fadrm.data import decode as fdecode
from fadrm.config import ConfigError, DataConfig, SelectConfig, load_config
from fadrm.datasource import DataSource
from fadrm.patches import _random_boxes, select_patches
from tests.test_data import write_idx_set

CPU = torch.device("cpu")
MEAN, STD = [0.5] * 3, [0.5] * 3


class BrightnessTeacher(nn.Module):
    """Class 0 likes bright inputs, class 1 dark ones: realism grows with brightness."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.mean(dim=(1, 2, 3))
        return torch.stack([10 * b, -10 * b], dim=1)


def _folder(root: Path, images: dict[str, list[np.ndarray]]) -> Path:
    for cls, arrays in images.items():
        (root / cls).mkdir(parents=True)
        for i, arr in enumerate(arrays):
            Image.fromarray(arr).save(root / cls / f"{i:03d}.png")
    return root


def _source(root: Path, resolution: int, **kw) -> DataSource:
    cfg = DataConfig(kind="imagefolder", root=str(root), resolution=resolution,
                     mean=MEAN, std=STD, **kw)
    cfg.validate("data")
    return DataSource(cfg)


def _select(source, full_resolution: bool, classes=(0,), ipc=1, **kw) -> torch.Tensor:
    cfg = SelectConfig(**{"num_candidates": 6, "num_crops": 5, "batch_size": 8,
                          "full_resolution": full_resolution, **kw})
    cfg.validate("select")
    return select_patches(BrightnessTeacher(), source, list(classes), ipc, cfg, MEAN, STD,
                          seed=0, device=CPU)


def test_full_resolution_patches_reach_content_outside_the_centre_square(tmp_path):
    # 16 x 48 px images, resolution 16: the class's bright content lies only in the left and
    # right borders, which the 16 x 16 centre square (columns 16..31) never sees.
    image = np.full((16, 48, 3), 20, dtype=np.uint8)
    image[:, :6] = image[:, 42:] = 230
    source = _source(_folder(tmp_path / "train", {"a": [image] * 6, "b": [image] * 6}), 16)
    centre = _select(source, full_resolution=False, crop_scale=[0.08, 0.3])
    full = _select(source, full_resolution=True, crop_scale=[0.08, 0.3])
    assert int(centre.max()) == 20  # only the dark centre square was there to crop
    assert int(full.max()) == 230 and float(full.float().mean()) > 60


def test_fine_detail_survives_full_resolution_but_not_downscale_then_upscale(tmp_path):
    # 128 px stripes of period 4; resolution 32 turns them into flat grey before cropping,
    # while a small crop of the original, resized to 32, keeps them.
    stripes = np.zeros((128, 128, 3), dtype=np.uint8)
    stripes[:, (np.arange(128) % 4) < 2] = 255
    source = _source(_folder(tmp_path / "train", {"a": [stripes] * 4, "b": [stripes] * 4}), 32)

    def detail(images: torch.Tensor) -> float:
        x = images.float()
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    centre = _select(source, full_resolution=False, ipc=2, crop_scale=[0.08, 0.1])
    full = _select(source, full_resolution=True, ipc=2, crop_scale=[0.08, 0.1])
    assert detail(centre) < 5 < 50 < detail(full)


def test_an_unreadable_candidate_makes_room_for_the_next(tmp_path):
    image = np.full((16, 24, 3), 200, dtype=np.uint8)
    root = _folder(tmp_path / "train", {"a": [image] * 3, "b": [image] * 3})
    (root / "a" / "000.png").write_bytes(b"not a png")
    source = _source(root, 16)
    originals = source.class_originals(0, [0, 1, 2], 2)
    assert [tuple(x.shape) for x in originals] == [(3, 16, 24)] * 2
    assert _select(source, True, ipc=2, num_candidates=3).shape == (1, 2, 3, 16, 16)


def test_same_bytes_for_images_stored_at_the_resolution(tmp_path):
    rng = np.random.default_rng(0)
    images = {c: [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(12)]
              for c in ("a", "b")}
    source = _source(_folder(tmp_path / "train", images), 20)
    for factor in (1, 2):
        old = _select(source, False, classes=(0, 1), ipc=2, factor=factor, num_candidates=10)
        new = _select(source, True, classes=(0, 1), ipc=2, factor=factor, num_candidates=10)
        assert torch.equal(old, new)


def test_same_bytes_for_idx_data(tmp_path):
    write_idx_set(tmp_path / "idx", n_train=60, num_classes=2)
    for resolution in (28, 32):  # the stored size, and upsampled in memory
        cfg = DataConfig(kind="idx", root=str(tmp_path / "idx"), resolution=resolution,
                         channels=1, mean=[0.5], std=[0.5])
        out = [select_patches(BrightnessTeacher(), DataSource(cfg), [0, 1], 2,
                              SelectConfig(num_candidates=10, num_crops=3, full_resolution=full),
                              [0.5], [0.5], seed=3, device=CPU)
               for full in (False, True)]
        assert torch.equal(out[0], out[1])


def test_square_boxes_on_square_images_are_the_earlier_sampler_s():
    # The sampler select used before: one area draw, then rows, then columns.
    def earlier(count, size, scale, gen):
        lo, hi = scale
        area = size * size * (lo + (hi - lo) * torch.rand(count, generator=gen))
        side = area.sqrt().round().clamp(1, size)
        y0 = (torch.rand(count, generator=gen) * (size - side + 1)).floor()
        x0 = (torch.rand(count, generator=gen) * (size - side + 1)).floor()
        return torch.stack([x0, y0, x0 + side, y0 + side], dim=1)

    sizes = torch.tensor([[28, 28]]).repeat(500, 1)
    for scale in ([0.08, 1.0], [0.5, 1.0]):
        want = earlier(500, 28, scale, torch.Generator().manual_seed(7))
        got = _random_boxes(sizes, scale, [1.0, 1.0], torch.Generator().manual_seed(7))
        assert torch.equal(got, want)


def test_boxes_follow_torchvision_ratio_range_and_centre_fallback():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[90, 120], [120, 90], [64, 64]]).repeat(200, 1)
    boxes = _random_boxes(sizes, [0.08, 1.0], [3 / 4, 4 / 3], gen)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 3] <= sizes[:, 0]).all()
    aspect = w / h
    assert aspect.min() >= 0.7 and aspect.max() <= 1.4 and aspect.std() > 0.05
    # Nothing of area >= 90 % fits a 10 x 100 strip as a square: torchvision's fallback is
    # the centre crop with the ratio clamped to the range (10 x 10 at x = 45).
    strip = _random_boxes(torch.tensor([[10, 100]] * 4), [0.9, 1.0], [1.0, 1.0], gen)
    assert strip.tolist() == [[45.0, 0.0, 55.0, 10.0]] * 4


def test_huge_jpeg_is_decoded_small_but_never_below_the_resolution(tmp_path):
    big = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(big).save(tmp_path / "a" / "0.jpg", quality=90)
    f = fdecode._File(str(tmp_path / "a" / "0.jpg"), "a/0.jpg", 0, 0, 0)
    h, w, _ = fdecode._decode_original(f, 64, "RGB").shape
    assert (h, w) == (96, 128)  # DCT-scaled by 8: shorter side 96 >= 64
    h, w, _ = fdecode._decode_original(f, 200, "RGB").shape
    assert min(h, w) >= 200 and (h, w) == (384, 512)


# --------------------------------------------------------------------------- validation


def _torchvision_eval(path: Path, resolution: int, ratio: float) -> np.ndarray:
    from torchvision import transforms

    t = transforms.Compose([transforms.Resize(round(resolution / ratio)),
                            transforms.CenterCrop(resolution)])
    return np.asarray(t(Image.open(path).convert("RGB")))


def test_validation_transform_is_torchvision_resize_and_centre_crop(tmp_path):
    rng = np.random.default_rng(1)
    shapes = [(50, 37), (37, 50), (27, 61), (64, 64), (20, 25), (100, 33)]
    val = {c: [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
           for c in ("a", "b")}
    _folder(tmp_path / "val", val)
    train = {c: [np.zeros((24, 24, 3), np.uint8)] for c in ("a", "b")}
    _folder(tmp_path / "train", train)
    source = _source(tmp_path / "train", 24, val_root=str(tmp_path / "val"),
                     val_crop_ratio=0.875)
    got = source.split("val").images
    files = sorted((tmp_path / "val").rglob("*.png"))
    want = np.stack([_torchvision_eval(p, 24, 0.875) for p in files])
    np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), want)
    # load_data (the in-memory path) decodes validation the same way; training stays square.
    train_set, val_set = fdata.load_data(source.cfg)
    assert torch.equal(val_set.images, got) and train_set.images.shape[-2:] == (24, 24)
    # Without the ratio: the old centre square, which is not torchvision's transform.
    old = _source(tmp_path / "train", 24, val_root=str(tmp_path / "val")).split("val").images
    assert not torch.equal(old, got)


def test_validation_transform_of_idx_data_within_rounding(tmp_path):
    from torchvision.transforms import v2

    arrays = write_idx_set(tmp_path / "idx")
    cfg = DataConfig(kind="idx", root=str(tmp_path / "idx"), resolution=28, channels=1,
                     mean=[0.5], std=[0.5], val_crop_ratio=0.875)
    train, val = fdata.load_data(cfg)
    raw = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).unsqueeze(1).float()
    want = v2.CenterCrop(28)(v2.Resize(32, antialias=True)(raw)).round()
    assert (val.images.float() - want).abs().max() <= 1
    assert torch.equal(train.images, torch.from_numpy(arrays["train-images-idx3-ubyte"])
                       .unsqueeze(1))  # training images untouched


@pytest.mark.parametrize("bad", [0, -0.5, 1.5])
def test_val_crop_ratio_is_validated(bad):
    with pytest.raises(ConfigError, match=r"^data\.val_crop_ratio: must be in \(0, 1\]"):
        DataConfig(root="/x", val_crop_ratio=bad).validate("data")
    DataConfig(root="/x", val_crop_ratio=1).validate("data")


def test_select_crop_ratio_is_validated():
    with pytest.raises(ConfigError, match=r"^select\.crop_ratio"):
        SelectConfig(crop_ratio=[1.2, 0.9]).validate("select")


# --------------------------------------------------------------------------- keys


def test_val_crop_ratio_changes_only_the_evaluate_key(fmnist_root, tmp_path):
    from fadrm.plan import RunPlan
    from tests.conftest import tiny_run_config

    base = tiny_run_config(tmp_path, fmnist_root)
    plain, ratio = (RunPlan(load_config(base, extra))
                    for extra in ([], ["data.val_crop_ratio=0.875"]))
    # The data fingerprint (and with it the listing, the teacher and every image stage)
    # does not depend on how validation images are cut; the student's evaluation does.
    assert plain.data_fp == ratio.data_fp
    for a, b in zip(plain.stages[:-1], ratio.stages[:-1]):
        assert a.key.key == b.key.key, a.label
    assert plain.evaluate.key.key != ratio.evaluate.key.key
    assert "val_crop_ratio" not in plain.evaluate.key.components  # older keys stay put


def test_new_select_settings_keep_older_keys_where_they_change_nothing(fmnist_root,
                                                                         tmp_path):
    import dataclasses as dc

    from fadrm.plan import RunPlan
    from tests.conftest import tiny_run_config

    cfg = load_config(tiny_run_config(tmp_path, fmnist_root))
    plan = RunPlan(cfg)
    # IDX images are stored at the resolution, and square patches are what select always
    # cut: the key holds exactly the settings select had before these two existed.
    before = {f.name for f in dc.fields(cfg.select)} - {"full_resolution", "crop_ratio"}
    assert set(plan.select.key.components["select"]) == before
    wider = RunPlan(load_config(tiny_run_config(tmp_path, fmnist_root),
                                ["select.crop_ratio=[0.75,1.3333]"]))
    assert wider.select.key.key != plan.select.key.key


def test_select_key_changes_with_full_resolution(tmp_path):
    from fadrm.plan import RunPlan

    image = np.zeros((8, 8, 3), np.uint8)
    root = _folder(tmp_path / "train", {"a": [image] * 3, "b": [image] * 3})
    base = {"name": "k", "output": str(tmp_path / "out"), "ipc": 1,
            "data": {"kind": "imagefolder", "root": str(root), "resolution": 8},
            "teachers": ["convnet"], "student": {"model": "convnet"}}
    keys = [RunPlan(load_config(base, [f"select.full_resolution={v}"])).select.key.key
            for v in ("true", "false")]
    assert keys[0] != keys[1]


def test_224_presets_use_the_imagenet_evaluation_transform():
    for name in ("imagenette-fadrm", "imagewoof-fadrm", "imagenet1k-fadrm"):
        cfg = load_config(name)
        assert cfg.data.resolution == 224 and cfg.data.val_crop_ratio == 0.875
        assert round(224 / cfg.data.val_crop_ratio) == 256 and cfg.select.full_resolution
