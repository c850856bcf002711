"""Student training: exact replay of the stored views, loss/optimiser details, learning."""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import fadrm.optim
from fadrm.config import RelabelConfig, StudentConfig
from fadrm.data import ImageSet, normalize
from fadrm.formats.labels import epoch_table, soft_targets, views_from_table
from fadrm.relabel import apply_views, make_views, relabel_epochs
from fadrm.student import cosine_lr, kd_loss_sum, micro_batches, param_groups, train_student

torch.set_num_threads(1)

CPU = torch.device("cpu")
MEAN, STD = [0.5, 0.5], [0.25, 0.25]


def tiny_net(num_classes: int = 4, seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d(8) if bn else nn.Identity()
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), norm, nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


def intensity_data(per_class: int, seed: int, size: int = 8) -> ImageSet:
    """4 classes = dark/bright channel 0 x dark/bright channel 1, plus pixel noise.

    Mean brightness survives crops and flips, so every view keeps its class evidence."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    level = torch.stack([labels & 1, (labels >> 1) & 1], dim=1).float() * 120.0 + 60.0
    pixels = level[:, :, None, None] + 25.0 * torch.randn(len(labels), 2, size, size,
                                                          generator=g)
    images = pixels.round().clamp(0, 255).to(torch.uint8)
    return ImageSet(images=images, labels=labels, classes=["a", "b", "c", "d"])


def fit_teacher(data: ImageSet, steps: int = 150) -> nn.Module:
    teacher = tiny_net(seed=1)
    opt = torch.optim.Adam(teacher.parameters(), lr=0.02)
    x = normalize(data.images, MEAN, STD)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(teacher(x), data.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval()


def student_cfg(**kw) -> StudentConfig:
    base = {"lr": 1e-2, "weight_decay": 0.01, "temperature": 4.0, "eta": 1.0,
            "accumulation_steps": 2, "eval_batch_size": 64, "mixed_precision": False}
    base.update(kw)
    return StudentConfig(**base)


@torch.no_grad()
def replay_kl(model: nn.Module, images: torch.Tensor, table, temperature: float = 4.0) -> float:
    """Mean KL to the stored soft labels over epoch 0's views (eval mode)."""
    model.eval()
    views = views_from_table(table, 0)
    rows = epoch_table(table, 0)
    total = 0.0
    for s in views.batch_slices():
        x = apply_views(normalize(images, MEAN, STD), views[s], 8)
        t = soft_targets(rows.slice(s.start, s.stop - s.start), 4)
        total += kd_loss_sum(model(x), t, temperature).item()
    return total / len(views)


# --------------------------------------------------------------------------- pieces


def test_cosine_schedule_values():
    assert cosine_lr(1.0, 0, 10, 1.0) == 1.0
    assert cosine_lr(1.0, 5, 10, 1.0) == pytest.approx(0.5)
    assert cosine_lr(2.0, 10, 10, 2.0) == pytest.approx(1.0)  # eta = 2 ends at half
    assert cosine_lr(1.0, 3, 10, 2.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 20)))


def test_kd_loss_is_batchmean_kl_without_t_squared():
    s, t = torch.randn(5, 7), torch.randn(5, 7) * 3
    temp = 20.0
    p = torch.softmax(t / temp, 1)
    manual = (p * (p.log() - torch.log_softmax(s / temp, 1))).sum() / 5
    torch.testing.assert_close(kd_loss_sum(s, t, temp) / 5, manual)


def test_param_groups_exclude_biases_and_norm_params():
    net = tiny_net()
    decay, no_decay = param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[5].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[5].bias)}


# --------------------------------------------------------------------------- training


class Probe(nn.Module):
    """Wraps a net, with two parameters that get zero gradient: AdamW moves them only by
    weight decay, which shows which optimiser group each one is in."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.extra_matrix = nn.Parameter(torch.ones(3, 3))
        self.extra_bias = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 0.0 * (self.extra_matrix.sum() + self.extra_bias.sum())


def test_student_replays_exact_views_and_stored_logits():
    data = intensity_data(4, seed=0)  # 16 "distilled" images
    teacher = tiny_net(seed=3).eval()
    torch.nn.init.uniform_(teacher[1].running_var, 0.5, 2.0)
    rcfg = RelabelConfig(batch_size=6, teacher_bn_mode="eval")
    table = relabel_epochs([teacher], data.images, MEAN, STD, rcfg, range(3), seed=9,
                           device=CPU, mixed_precision=False)
    seen: list[torch.Tensor] = []
    student = Probe(tiny_net(seed=4))
    student.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone())
                                      if m.training else None)
    cfg = student_cfg(weight_decay=0.1)
    lrs = []
    result = train_student(student, data.images, lambda e: table, data, cfg, 3, MEAN, STD,
                           4, CPU, seed=0, progress=lambda d, t: lrs.append((d, t)))

    expected = []
    x_all = normalize(data.images, MEAN, STD)
    for epoch in range(3):
        views = make_views(9, epoch, len(data), rcfg, 8)
        assert views_from_table(table, epoch).equals(views)
        stored = views_from_table(table, epoch)
        for s in stored.batch_slices():
            rows = epoch_table(table, epoch).slice(s.start, s.stop - s.start)
            x, t = apply_views(x_all, stored[s], 8), soft_targets(rows, 4)
            for part in micro_batches(len(x), cfg.accumulation_steps):
                expected.append((x[part], t[part]))
    # 3 stored batches (6, 6, 4) per epoch, each as 2 micro-batches (3+3, 3+3, 2+2).
    assert len(seen) == len(expected) == 18
    for got, (want, logits) in zip(seen, expected, strict=True):
        assert torch.equal(got, want)
        with torch.no_grad():
            again = teacher(got).half().float()
        assert torch.equal(again, logits)

    # Optimiser groups, observed through weight decay alone (zero gradients):
    # one step per stored batch, 3 per epoch, 9 in all.
    assert result["steps"] == 9
    decay = 1.0
    for e in range(3):
        decay *= (1 - cosine_lr(cfg.lr, e, 3, cfg.eta) * cfg.weight_decay) ** 3
    torch.testing.assert_close(student.extra_matrix.detach(), torch.full((3, 3), decay))
    assert torch.equal(student.extra_bias.detach(), torch.ones(3))

    assert [h["lr"] for h in result["history"]] == [cosine_lr(cfg.lr, e, 3, 1.0)
                                                    for e in range(3)]
    assert lrs == [(1, 3), (2, 3), (3, 3)]
    assert [h["top1"] is None for h in result["history"]] == [True, True, False]
    assert result["best_epoch"] == 2 and result["top1"] == result["top1_best"]


def test_student_learns_from_soft_labels_only():
    real = intensity_data(40, seed=1)
    teacher = fit_teacher(real)
    val = intensity_data(25, seed=2)
    distilled = intensity_data(5, seed=3).images  # 20 images
    rcfg = RelabelConfig(batch_size=5, teacher_bn_mode="eval")
    table = relabel_epochs([teacher], distilled, MEAN, STD, rcfg, range(20), seed=0,
                           device=CPU, mixed_precision=False)
    student = tiny_net(seed=5)
    before = replay_kl(copy.deepcopy(student), distilled, table)
    result = train_student(student, distilled, lambda e: table, val,
                           student_cfg(eval_every=5), 20, MEAN, STD, 4, CPU, seed=0)
    assert result["top1"] >= 80.0, result  # chance is 25 %
    assert replay_kl(student, distilled, table) < 0.75 * before
    evaluated = [h["epoch"] for h in result["history"] if h["top1"] is not None]
    assert evaluated == [4, 9, 14, 19]
    assert result["top1_best"] == max(h["top1"] for h in result["history"] if h["top1"])


def test_non_finite_loss_names_epoch_and_batch():
    data = intensity_data(3, seed=0)
    table = relabel_epochs([tiny_net(seed=1).eval()], data.images, MEAN, STD,
                           RelabelConfig(batch_size=4, teacher_bn_mode="eval"), range(1),
                           seed=0, device=CPU)
    student = tiny_net(seed=2)
    with torch.no_grad():
        student[5].bias.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="epoch 0, batch 0"):
        train_student(student, data.images, lambda e: table, data, student_cfg(), 1,
                      MEAN, STD, 4, CPU, seed=0)


def test_wrong_class_count_is_rejected():
    data = intensity_data(3, seed=0)
    table = relabel_epochs([tiny_net(seed=1).eval()], data.images, MEAN, STD,
                           RelabelConfig(batch_size=4), range(1), seed=0, device=CPU)
    with pytest.raises(ValueError, match="4 classes"):
        train_student(tiny_net(5), data.images, lambda e: table, data, student_cfg(), 1,
                      MEAN, STD, 5, CPU, seed=0)


# --------------------------------------------------------------------------- DDP


class RecordingAdamW(fadrm.optim.HostStepAdam):
    """The student's CPU AdamW, keeping a copy of the gradients it steps with (after DDP's
    all-reduce)."""

    steps: ClassVar[list[list[torch.Tensor]]] = []

    def step(self, closure=None):
        RecordingAdamW.steps.append(
            [p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def _train_recorded(images, table, val, cfg) -> tuple[nn.Module, dict, list]:
    RecordingAdamW.steps = []
    model = tiny_net(seed=7, bn=False)  # BN would see per-rank statistics
    original = fadrm.optim.HostStepAdam
    fadrm.optim.HostStepAdam = RecordingAdamW
    try:
        result = train_student(model, images, lambda e: table, val, cfg, 2, MEAN, STD, 4,
                               CPU, seed=0)
    finally:
        fadrm.optim.HostStepAdam = original
    return model, result, RecordingAdamW.steps


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str, payload: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model, result, grads = _train_recorded(**payload)
        if rank == 0:
            torch.save({"state": model.state_dict(), "result": result, "grads": grads},
                       out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_gradient_equals_full_batch(tmp_path):
    data = intensity_data(4, seed=0)
    images = data.images[:13]  # last batch holds 1 image: rank 1 gets an empty slice
    table = relabel_epochs([tiny_net(seed=1).eval()], images, MEAN, STD,
                           RelabelConfig(batch_size=4, teacher_bn_mode="eval"), range(2),
                           seed=0, device=CPU, mixed_precision=False)
    payload = {"images": images, "table": table, "val": data,
               "cfg": student_cfg(temperature=2.0)}

    single, ref, ref_grads = _train_recorded(**payload)
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out), payload), nprocs=2)
    got = torch.load(out, weights_only=False)
    # Stored batches (4, 4, 4, 1): one step each, 8 over 2 epochs, whatever the world size;
    # rank 1 gets no micro-batch of the last batch (1 row) and runs a zero-weight sample.
    assert len(got["grads"]) == len(ref_grads) == 8
    assert got["result"]["steps"] == ref["steps"] == 8
    for step_got, step_ref in zip(got["grads"], ref_grads, strict=True):
        for g, r in zip(step_got, step_ref, strict=True):
            torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-5)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(got["state"][name], value, atol=1e-5, rtol=1e-4)
    for a, b in zip(got["result"]["history"], ref["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert got["result"]["top1"] == ref["top1"]


def test_mixed_precision_training_runs_on_cpu():
    data = intensity_data(3, seed=0)
    table = relabel_epochs([tiny_net(seed=1).eval()], data.images, MEAN, STD,
                           RelabelConfig(batch_size=4), range(2), seed=0, device=CPU)
    result = train_student(tiny_net(seed=2), data.images, lambda e: table, data,
                           student_cfg(mixed_precision=True), 2, MEAN, STD, 4, CPU, seed=0)
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result["history"])
    assert 0.0 <= result["top1"] <= 100.0 and result["seconds"] > 0


def test_hard_loss_is_cross_entropy_to_the_targets():
    from fadrm.student import hard_loss_sum

    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    onehot = torch.nn.functional.one_hot(y, 4).float()
    torch.testing.assert_close(hard_loss_sum(logits, onehot),
                               nn.functional.cross_entropy(logits, y, reduction="sum"))
    mix = 0.3 * onehot + 0.7 * onehot.roll(1, 0)
    want = 0.3 * nn.functional.cross_entropy(logits, y, reduction="sum") + 0.7 * (
        nn.functional.cross_entropy(logits, y.roll(1, 0), reduction="sum"))
    torch.testing.assert_close(hard_loss_sum(logits, mix), want)


def test_student_learns_from_hard_labels():
    val = intensity_data(25, seed=2)
    distilled = intensity_data(5, seed=3)
    rcfg = RelabelConfig(batch_size=5, label_mode="hard")
    table = relabel_epochs([], distilled.images, MEAN, STD, rcfg, range(20), seed=0,
                           device=CPU, labels=distilled.labels, num_classes=4)
    result = train_student(tiny_net(seed=5), distilled.images, lambda e: table, val,
                           student_cfg(), 20, MEAN, STD, 4, CPU, seed=0)
    assert result["top1"] >= 80.0, result  # chance is 25 %
    assert all(math.isfinite(h["loss"]) for h in result["history"])
