"""Teacher training (squeeze): learns, is reproducible, fails loudly."""

from __future__ import annotations

import math

import pytest
import torch

from fadrm.config import DataConfig, SqueezeConfig
from fadrm.data import ImageSet
from fadrm.models import create_model
from fadrm.squeeze import augment_batch, lr_at, train_teacher

torch.set_num_threads(1)

CPU = torch.device("cpu")
DATA_CFG = DataConfig(kind="imagefolder", root="unused", resolution=16, channels=3,
                      mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def colour_classes(n_per_class: int, seed: int) -> ImageSet:
    """4 classes told apart by colour (red, green, blue, grey) under pixel noise.

    Colour survives crops and flips, so the task stays separable under augmentation.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [110, 110, 110]])
    labels = torch.arange(4).repeat_interleave(n_per_class)
    noise = torch.randint(-60, 61, (len(labels), 3, 16, 16), generator=g)
    images = (base[labels][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels, ["red", "green", "blue", "grey"])


def squeeze_cfg(**kw) -> SqueezeConfig:
    kw = {"epochs": 2, "batch_size": 16, "lr": 0.05, **kw}
    return SqueezeConfig(**kw)


def fresh_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("convnet", 4, in_chans=3, image_size=16)


def test_learns_a_separable_task_well_above_chance():
    train, val = colour_classes(24, seed=0), colour_classes(10, seed=1)
    model = fresh_model()
    steps = []
    top1 = train_teacher(model, train, val, squeeze_cfg(), DATA_CFG, CPU, seed=0,
                         progress=lambda done, total: steps.append((done, total)))
    assert top1 >= 90.0  # chance is 25 %
    assert not model.training
    assert steps[-1] == (2 * (96 // 16), 2 * (96 // 16))
    assert [d for d, _ in steps] == list(range(1, len(steps) + 1))


def test_same_seed_same_weights_other_seed_other_weights():
    train, val = colour_classes(8, seed=0), colour_classes(2, seed=1)
    cfg = squeeze_cfg(epochs=1)
    runs = []
    for seed in (3, 3, 4):
        model = fresh_model()
        train_teacher(model, train, val, cfg, DATA_CFG, CPU, seed=seed)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_non_finite_loss_stops_with_epoch_and_step():
    model = fresh_model()
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    data = colour_classes(4, seed=0)
    with pytest.raises(RuntimeError, match=r"non-finite loss.*epoch 1/2, step 1/"):
        train_teacher(model, data, data, squeeze_cfg(), DATA_CFG, CPU, seed=0)


def test_empty_validation_set_gives_nan():
    train = colour_classes(4, seed=0)
    empty = ImageSet(train.images[:0], train.labels[:0], train.classes)
    top1 = train_teacher(fresh_model(), train, empty, squeeze_cfg(epochs=1), DATA_CFG, CPU, 0)
    assert math.isnan(top1)


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 1e-3


def test_small_image_augmentation_is_a_shift_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, 12, 12)
    y = augment_batch(x, g)
    for i in range(len(x)):
        # Some flip and shift of at most 4 px reproduces the output's inner 4x4 exactly.
        matches = [
            (flip, dy, dx)
            for flip in (False, True)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.allclose(
                y[i, :, 4:8, 4:8],
                (x[i].flip(-1) if flip else x[i])[:, 4 + dy : 8 + dy, 4 + dx : 8 + dx],
                atol=1e-5,
            )
        ]
        assert matches, f"image {i} is not a shifted/flipped copy"


def test_large_image_augmentation_keeps_shape_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 96, 96)
    y = augment_batch(x, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(y, x)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        train, val = colour_classes(8, seed=0), colour_classes(2, seed=1)
        model = fresh_model()
        steps = []
        train_teacher(model, train, val, squeeze_cfg(epochs=1), DATA_CFG, CPU, seed=0,
                      progress=lambda d, t: steps.append((d, t)))
        torch.save({"state": model.state_dict(), "steps": steps}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_share_the_work_and_end_with_equal_weights(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # 32 images, global batch 16 -> 8 per rank -> 2 steps per epoch on each rank.
    assert r0["steps"] == r1["steps"] == [(1, 2), (2, 2)]
    for key, value in r0["state"].items():
        if key.endswith(("running_mean", "running_var")):
            continue  # BN statistics come from each rank's own last batch (plain DDP)
        assert torch.equal(value, r1["state"][key]), key
