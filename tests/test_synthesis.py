"""Data residual matching: BN loss, augmentation, ARC, MRO, method flags, teachers."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fadrm.config import RecoverConfig
from fadrm.data import pixel_bounds
from fadrm.synthesis import BNStatLoss, augment, channel_stats, cosine_lr, recover, resample

torch.set_num_threads(1)

MEAN, STD = [0.5], [0.25]
CPU = torch.device("cpu")


def tiny_teacher(num_classes: int = 4, channels: int = 1, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes),
    )


def no_bn_teacher(num_classes: int = 4) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, num_classes),
    )


def randomise_running_stats(net: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def stat_term(a: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    mu = a.mean(dim=(0, 2, 3))
    var = ((a - mu.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    return (mu - bn.running_mean).norm() + (var - bn.running_var).norm()


def init_images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    lo, hi = pixel_bounds(MEAN, STD)
    u = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return lo + (hi - lo) * u


def cfg_for(method: str, resolutions, iterations, **kw) -> RecoverConfig:
    cfg = RecoverConfig(method=method, resolutions=list(resolutions),
                        stage_iterations=list(iterations), lr=0.05, jitter=2, **kw)
    cfg.validate("recover")
    return cfg


# --------------------------------------------------------------------------- BN loss


def test_bn_loss_equals_hand_computation_and_multiplier_hits_first_layer_only():
    net = tiny_teacher().eval()
    randomise_running_stats(net)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        a1 = net[0](x)
        a2 = net[3](net[2](net[1](a1)))
    t1, t2 = stat_term(a1, net[1]), stat_term(a2, net[4])

    with BNStatLoss(net, first_multiplier=10.0) as bn10:
        assert bn10.num_layers == 2
        net(x)
        loss10 = bn10.loss()
    with BNStatLoss(net, first_multiplier=1.0) as bn1:
        net(x)
        loss1 = bn1.loss()
    assert loss10.item() == pytest.approx((10 * t1 + t2).item(), rel=1e-5)
    assert loss1.item() == pytest.approx((t1 + t2).item(), rel=1e-5)
    assert (loss10 - loss1).item() == pytest.approx(9 * t1.item(), rel=1e-4)


def test_bn_loss_is_zero_when_batch_stats_equal_running_stats():
    net = tiny_teacher().eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        a1 = net[0](x)
        mu = a1.mean(dim=(0, 2, 3))
        net[1].running_mean.copy_(mu)
        net[1].running_var.copy_(a1.var(dim=(0, 2, 3), unbiased=False))
        a2 = net[3](net[2](net[1](a1)))  # uses bn1's new statistics
        net[4].running_mean.copy_(a2.mean(dim=(0, 2, 3)))
        net[4].running_var.copy_(a2.var(dim=(0, 2, 3), unbiased=False))
    with BNStatLoss(net) as bn:
        net(x)
        assert bn.loss().item() == pytest.approx(0.0, abs=1e-5)
        net(x + 1.0)  # shifted batch: the statistics no longer match
        assert bn.loss().item() > 1.0


def test_bn_loss_resets_per_forward_detaches_and_is_fp32_under_autocast():
    net = tiny_teacher().eval()
    randomise_running_stats(net)
    xa, xb = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8) * 3
    bn = BNStatLoss(net).attach()
    net(xb)
    expected_b = bn.loss().item()
    net(xa)
    net(xb)
    assert bn.loss().item() == pytest.approx(expected_b, rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(xa)
    assert all(t.dtype == torch.float32 for t in bn.terms())
    bn.remove()
    before = bn.loss().item()
    net(xb)  # hooks gone: nothing recorded
    assert bn.loss().item() == before


def test_bn_loss_without_batchnorm_is_zero():
    bn = BNStatLoss(no_bn_teacher()).attach()
    bn.model(torch.randn(2, 1, 8, 8))
    assert bn.num_layers == 0
    assert isinstance(bn.loss(), torch.Tensor) and bn.loss().item() == 0.0


# --------------------------------------------------------------------------- augment


def test_augment_shape_and_gradient():
    x = torch.randn(3, 2, 12, 12, requires_grad=True)
    out = augment(x, 8, [0.08, 1.0], True, 2, torch.Generator().manual_seed(0))
    assert out.shape == (3, 2, 8, 8)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(x.grad[i].abs().sum() > 0 for i in range(3))  # every sample gets gradient


def test_augment_crops_and_flips_per_sample():
    image = torch.randn(1, 1, 10, 10)
    x = image.repeat(16, 1, 1, 1)
    crops = augment(x, 10, [0.08, 0.5], False, 0, torch.Generator().manual_seed(0))
    distinct = {tuple(c.flatten().round(decimals=4).tolist()) for c in crops}
    assert len(distinct) == 16  # one crop per sample, not one shared crop

    flips = augment(x, 10, [1.0, 1.0], True, 0, torch.Generator().manual_seed(0))
    is_same = [torch.allclose(f, image[0], atol=1e-5) for f in flips]
    is_flip = [torch.allclose(f, image[0].flip(-1), atol=1e-5) for f in flips]
    assert all(a != b for a, b in zip(is_same, is_flip))  # each is exactly one of the two
    assert any(is_same) and any(is_flip)


def test_augment_crop_boxes_follow_random_resized_crop():
    size, side = 16, 32
    ramp = torch.arange(side, dtype=torch.float32)
    # channel 0 = column index, channel 1 = row index: output slopes reveal the crop box
    x = torch.stack([ramp.expand(side, side), ramp[:, None].expand(side, side)])
    x = x.expand(8, 2, side, side)
    out = augment(x, size, [0.25, 0.25], False, 0, torch.Generator().manual_seed(2))
    middle = slice(3, size - 3)
    w = out[:, 0, middle, :].diff(dim=-1)[..., middle].mean(dim=(1, 2)) * size
    h = out[:, 1, :, middle].diff(dim=-2)[:, middle].mean(dim=(1, 2)) * size
    assert torch.allclose(w * h, torch.full((8,), 0.25 * side * side), rtol=1e-3)
    assert ((w / h >= 3 / 4 - 1e-3) & (w / h <= 4 / 3 + 1e-3)).all()
    assert w.max() - w.min() > 0.5  # aspect ratios drawn per sample
    # scale 1, no flip, no jitter: a plain bilinear resize of the whole image
    whole = augment(x, size, [1.0, 1.0], False, 0, torch.Generator().manual_seed(0))
    resized = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    assert torch.allclose(whole, resized, atol=1e-4)


def test_augment_jitter_is_a_bounded_roll():
    jitter = 2
    x = torch.randn(12, 1, 9, 9)
    out = augment(x, 9, [1.0, 1.0], False, jitter, torch.Generator().manual_seed(1))
    shifts = []
    for b in range(12):
        found = [
            (dy, dx)
            for dy, dx in itertools.product(range(-jitter, jitter + 1), repeat=2)
            if torch.allclose(out[b], torch.roll(x[b], (dy, dx), dims=(1, 2)), atol=1e-5)
        ]
        assert found, f"sample {b} is not a roll of its input by <= {jitter}"
        shifts.append(found[0])
    assert len(set(shifts)) > 1  # shifts are drawn per sample


def test_augment_is_deterministic_for_a_generator_seed():
    x = torch.randn(4, 1, 8, 8)
    a = augment(x, 6, [0.08, 1.0], True, 2, torch.Generator().manual_seed(5))
    b = augment(x, 6, [0.08, 1.0], True, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_resample_and_cosine_lr():
    x = torch.randn(2, 1, 8, 8)
    assert resample(x, 8) is x
    assert resample(x, 5).shape == (2, 1, 5, 5)
    assert resample(x, 12).shape == (2, 1, 12, 12)
    assert resample(torch.full((1, 1, 8, 8), 0.3), 5).allclose(torch.full((1, 1, 5, 5), 0.3))
    assert cosine_lr(0.2, 0, 100) == pytest.approx(0.2)
    assert cosine_lr(0.2, 50, 100) == pytest.approx(0.1)
    assert cosine_lr(0.2, 100, 100) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- recover


def record_stages():
    calls = []
    return calls, lambda s, before, after: calls.append((s, before, after))


def test_arc_with_zero_iterations_is_exact():
    cfg = cfg_for("fadrm", [16, 12, 16], [0, 0, 0], alpha=0.3)
    init, source = init_images(seed=0), init_images(seed=1)
    calls, hook = record_stages()
    res = recover(init, torch.arange(4), [tiny_teacher()], cfg, MEAN, STD, 16, 0, CPU,
                  residual_source=source, on_stage_end=hook)
    a = cfg.alpha
    # The reference's order: x to the next resolution first, then mix in P resized straight
    # from full resolution (P never passes through the 12 px stage on its way to 16 px).
    after0 = a * resample(init, 12) + (1 - a) * resample(source, 12)
    before1 = after0
    after1 = a * resample(before1, 16) + (1 - a) * source
    final = after1
    assert [c[0] for c in calls] == [0, 1, 2]
    assert torch.allclose(calls[0][2], after0, atol=1e-6)
    assert torch.allclose(calls[1][1], before1, atol=1e-6)
    assert torch.allclose(calls[1][2], after1, atol=1e-6)
    # Today's order would have mixed at 12 px and upsampled: P loses detail that way.
    old_order = resample(a * before1 + (1 - a) * resample(source, 12), 16)
    assert not torch.allclose(after1, old_order, atol=1e-3)
    assert torch.equal(calls[2][1], calls[2][2])  # no residual after the last stage
    assert torch.allclose(res.images, final, atol=1e-6)
    assert res.stage_resolutions == [16, 12, 16] and res.losses == []


def test_arc_and_mro_with_optimisation():
    cfg = cfg_for("fadrm", [16, 12, 16], [3, 3, 3], alpha=0.5)
    init = init_images()
    calls, hook = record_stages()
    res = recover(init, torch.arange(4), [tiny_teacher()], cfg, MEAN, STD, 16, 0, CPU,
                  on_stage_end=hook)
    assert res.stage_resolutions == [16, 12, 16]
    assert len(res.losses) == 9
    assert [tuple(c[1].shape[-2:]) for c in calls] == [(16, 16), (12, 12), (16, 16)]
    for stage, res_px, next_px in ((0, 16, 12), (1, 12, 16)):
        _, before, after = calls[stage]
        assert not torch.allclose(before, resample(init, res_px))  # x was optimised
        expected = 0.5 * resample(before, next_px) + 0.5 * resample(init, next_px)
        assert torch.allclose(after, expected, atol=1e-6)
    assert torch.equal(calls[2][1], calls[2][2])
    assert torch.equal(res.images, calls[2][2])  # last stage is at the data resolution


def test_sre2l_single_resolution_no_residual():
    cfg = cfg_for("sre2l", [16, 12, 16], [2, 2, 2])
    calls, hook = record_stages()
    res = recover(init_images(), torch.arange(4), [tiny_teacher()], cfg, MEAN, STD, 16, 0,
                  CPU, on_stage_end=hook)
    assert res.stage_resolutions == [16]
    assert len(res.losses) == 6  # the whole budget in one stage
    assert len(calls) == 1 and torch.equal(calls[0][1], calls[0][2])


@pytest.mark.parametrize("method", ["rded", "random-real"])
def test_selection_only_methods_return_init_unchanged(method):
    teacher = tiny_teacher()
    calls = []
    teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    init = init_images()
    res = recover(init, torch.arange(4), [teacher], cfg_for(method, [16], [5]), MEAN, STD,
                  16, 0, CPU)
    assert torch.equal(res.images, init) and res.losses == [] and not calls


def test_teachers_are_used_round_robin_and_bn_free_teacher_works():
    teachers = [tiny_teacher(seed=0), no_bn_teacher(), tiny_teacher(seed=2)]
    order: list[int] = []
    for i, t in enumerate(teachers):
        t.register_forward_pre_hook(lambda *_, i=i: order.append(i))
    cfg = cfg_for("fadrm+", [8, 8, 8], [3, 3, 3])
    res = recover(init_images(size=8), torch.arange(4), teachers, cfg, MEAN, STD, 8, 0, CPU)
    assert order == [0, 1, 2] * 3
    assert len(res.losses) == 9 and all(torch.isfinite(torch.tensor(res.losses)))


def test_recover_is_deterministic_clamped_and_restores_teacher_state():
    teacher = tiny_teacher().train()
    cfg = cfg_for("fadrm", [16, 12, 16], [4, 4, 4])
    cfg.lr = 5.0  # large steps push pixels against the bounds
    progress: list[tuple[int, int]] = []
    runs = [
        recover(init_images(), torch.arange(4), [teacher], cfg, MEAN, STD, 16, 7, CPU,
                progress=lambda d, t: progress.append((d, t)))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].images, runs[1].images)
    assert runs[0].losses == runs[1].losses
    other = recover(init_images(), torch.arange(4), [teacher], cfg, MEAN, STD, 16, 8, CPU)
    assert not torch.equal(other.images, runs[0].images)
    lo, hi = pixel_bounds(MEAN, STD)
    assert runs[0].images.min() >= lo.min() - 1e-6 and runs[0].images.max() <= hi.max() + 1e-6
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert progress[:2] == [(10, 12), (12, 12)]


def test_non_finite_loss_names_the_iteration():
    class NaNAfter(nn.Module):
        def __init__(self, good: int):
            super().__init__()
            self.calls, self.good = 0, good
            self.linear = nn.Linear(1, 4)

        def forward(self, x):
            self.calls += 1
            logits = self.linear(x.mean(dim=(1, 2, 3))[:, None])
            return logits * float("nan") if self.calls > self.good else logits

    cfg = cfg_for("sre2l", [8], [20])
    with pytest.raises(RuntimeError, match="iteration 13"):
        recover(init_images(size=8), torch.arange(4), [NaNAfter(13)], cfg, MEAN, STD, 8, 0,
                CPU)


def separable_data(n_per_class: int, size: int = 8, seed: int = 0):
    """Class k: a bright quadrant k on a dark, noisy background (normalised)."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = [], []
    half = size // 2
    for k in range(4):
        x = 0.2 + 0.1 * torch.rand(n_per_class, 1, size, size, generator=gen)
        r, c = divmod(k, 2)
        x[:, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 0.6
        images.append(x)
        labels.append(torch.full((n_per_class,), k))
    return (torch.cat(images) - MEAN[0]) / STD[0], torch.cat(labels)


@pytest.mark.parametrize("method", ["sre2l", "fadrm"])
def test_recover_lowers_its_loss_on_a_trained_teacher(method):
    teacher = tiny_teacher()
    x, y = separable_data(32)
    opt = torch.optim.Adam(teacher.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(teacher(x[idx]), y[idx]).backward()
        opt.step()
    teacher.eval()
    assert (teacher(x).argmax(1) == y).float().mean() > 0.9  # the teacher learnt the task

    cfg = cfg_for(method, [8, 8], [40, 40], crop_scale=[0.5, 1.0])
    init = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    res = recover(init, torch.arange(4), [teacher], cfg, MEAN, STD, 8, 0, CPU)
    tenth = len(res.losses) // 10
    first, last = res.losses[:tenth], res.losses[-tenth:]
    assert sum(last) / tenth < sum(first) / tenth


def test_fresh_adam_per_stage_under_one_cosine_schedule(monkeypatch):
    created: list[torch.optim.Optimizer] = []
    lrs: list[float] = []

    import fadrm.optim

    # Recover's Adam on the CPU: torch's arithmetic with the step count on the host.
    class RecordingAdam(fadrm.optim.HostStepAdam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(fadrm.optim, "HostStepAdam", RecordingAdam)
    cfg = cfg_for("fadrm", [8, 6, 8], [3, 2, 3])
    recover(init_images(size=8), torch.arange(4), [tiny_teacher()], cfg, MEAN, STD, 8, 0, CPU)
    assert len(created) == 3  # Adam state is reset at every stage
    assert all(opt.defaults["betas"] == (0.5, 0.9) for opt in created)
    assert lrs == pytest.approx([cosine_lr(cfg.lr, t, 8) for t in range(8)])


# --------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_stats_match_var_mean_values_and_gradient(dtype, channels_last):
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(6, 5, 7, 7, generator=gen) * 2 + 3).to(dtype)
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    shift = torch.randn(5, generator=gen)
    g_mean, g_var = torch.randn(5, generator=gen), torch.randn(5, generator=gen)

    x = base.clone().requires_grad_(True)
    offset, var = channel_stats(x, shift)
    ((offset * g_mean).sum() + (var * g_var).sum()).backward()
    ref_x = base.clone().requires_grad_(True)
    ref_var, ref_mean = torch.var_mean(ref_x.float(), dim=(0, 2, 3), correction=0)
    (((ref_mean - shift) * g_mean).sum() + (ref_var * g_var).sum()).backward()

    assert offset.dtype == var.dtype == torch.float32
    torch.testing.assert_close(offset, ref_mean - shift, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, ref_var, atol=1e-5, rtol=1e-5)
    assert x.grad.dtype == dtype and x.grad.stride() == ref_x.grad.stride()
    tol = 1e-6 if dtype == torch.float32 else 2 * 2.0**-8 * ref_x.grad.abs().max().item()
    torch.testing.assert_close(x.grad.float(), ref_x.grad.float(), atol=tol, rtol=1e-4)


def test_channel_stats_of_a_constant_channel_is_finite():
    x = torch.zeros(3, 2, 4, 4)
    x[:, 1] = torch.randn(3, 4, 4)
    x.requires_grad_(True)
    offset, var = channel_stats(x, torch.zeros(2))
    assert var[0].item() == 0.0 and torch.isfinite(var).all()
    (offset.sum() + var.sum()).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("method, rtol", [("sre2l", 1e-4), ("fadrm", 0.03)])
def test_channels_last_recover_gives_the_same_losses(method, rtol):
    # fp32 (sre2l): equal up to float rounding; bf16 autocast (fadrm): up to bf16 rounding.
    cfg_plain = cfg_for(method, [16, 12, 16], [3, 3, 3], channels_last=False)
    cfg_nhwc = cfg_for(method, [16, 12, 16], [3, 3, 3], channels_last=True)
    teacher = tiny_teacher()
    randomise_running_stats(teacher)
    plain = recover(init_images(), torch.arange(4), [teacher], cfg_plain, MEAN, STD, 16, 0, CPU)
    assert teacher[3].weight.is_contiguous()
    nhwc = recover(init_images(), torch.arange(4), [teacher], cfg_nhwc, MEAN, STD, 16, 0, CPU)
    assert teacher[3].weight.is_contiguous()  # layout restored afterwards
    torch.testing.assert_close(torch.tensor(nhwc.losses), torch.tensor(plain.losses),
                               rtol=rtol, atol=1e-5)
    torch.testing.assert_close(nhwc.images, plain.images, rtol=0, atol=0.05)

    teacher.to(memory_format=torch.channels_last)  # a channels_last teacher stays so
    recover(init_images(), torch.arange(4), [teacher], cfg_nhwc, MEAN, STD, 16, 0, CPU)
    # (conv 3: 6 -> 6 channels, where the two layouts differ)
    assert teacher[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert not teacher[3].weight.is_contiguous()


def test_bn_loss_is_layout_independent():
    net = tiny_teacher().eval()
    randomise_running_stats(net)
    x = torch.randn(5, 1, 8, 8)
    with BNStatLoss(net) as bn:
        net(x)
        plain = bn.loss().item()
        net.to(memory_format=torch.channels_last)
        net(x.contiguous(memory_format=torch.channels_last))
        nhwc = bn.loss().item()
    assert nhwc == pytest.approx(plain, rel=1e-5)


@pytest.mark.slow
def test_compiled_recover_gives_the_same_losses():
    cfg = cfg_for("sre2l", [16], [4])
    teacher = tiny_teacher()
    randomise_running_stats(teacher)
    eager = recover(init_images(), torch.arange(4), [teacher], cfg, MEAN, STD, 16, 0, CPU)
    cfg.compile = True
    compiled = recover(init_images(), torch.arange(4), [teacher], cfg, MEAN, STD, 16, 0, CPU)
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses),
                               rtol=1e-4, atol=1e-5)
    assert "_fadrm_compiled" not in teacher.state_dict()
