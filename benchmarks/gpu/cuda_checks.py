"""Checks of every CUDA code path, as plain functions (no pytest: stock GPU images lack it).

Each ``check_*`` takes the device to test (``"cuda"``; ``"cpu"`` rehearses the check on a
machine without a GPU, comparing the CPU with itself) and raises ``AssertionError`` with a
message that says what differed and by how much. ``python -m benchmarks.gpu_check`` runs them
all; ``tests/test_cuda.py`` wraps them for pytest (marker ``cuda``).

Comparisons of CUDA against the CPU run in strict fp32 (``strict_fp32`` in
:mod:`benchmarks.gpu.compare`, with the tolerances and fixtures): CUDA's default lets cuDNN
convolutions use TF32 (10-bit mantissa), whose rounding (~1e-3) would hide the differences
these checks are looking for. Comparisons *after optimisation steps* use the
shallow built-in ConvNet: a randomly initialised ResNet-18's input and weight gradients are
ill-conditioned (fp32 and fp64 gradients differ by ~0.3 % on the CPU alone, and a few steps
amplify that), while the ConvNet's agree to ~1e-7, so CUDA can be held to ~1e-3 of the
CPU's update. ResNet-18 is used where only forward values are compared (BN statistics,
relabel logits) and for the fp16 runs, which are checked for finiteness and progress.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import io
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.gpu.common import MEAN, STD, make_image_folder, sync, tiny_cpu_config
from benchmarks.gpu.compare import (assert_close, assert_update_close, calibrate_bn, convnet,
                                    flat, params_of, pixels, resnet18, state_of, strict_fp32,
                                    uint8_images)
from benchmarks.gpu.loop_checks import (check_compiled_recover_matches_eager,
                                        check_fp16_recover_loop,
                                        check_steady_states_never_sync)

__all__ = ["CHECKS", "Check", "cuda_available"]

CPU = torch.device("cpu")
NO_DEVICE_MESSAGE = "execution.device is 'cuda' but no CUDA device is available"


def cuda_available() -> bool:
    """Whether a CUDA GPU can be used here (False on CPU-only torch builds too)."""
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _device(name: str | torch.device) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not cuda_available():
        raise RuntimeError("no CUDA GPU on this machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# --------------------------------------------------------------------------- the checks


def check_recover_step_matches_cpu(device: str = "cuda") -> None:
    """Five fp32 recover iterations (SRe2L: no autocast) on ``device`` and on the CPU.

    Same ConvNet teacher, images and seed: every loss within rtol 1e-4, and the pixel
    update (result - init) within 1e-3 (relative L2) of the CPU's; the result comes back to
    the CPU.
    """
    from fadrm.config import RecoverConfig
    from fadrm.synthesis import recover

    dev = _device(device)
    teacher = convnet(10, seed=0)
    init = pixels(8, 32, seed=2)
    labels = torch.arange(8) % 10
    cfg = RecoverConfig(method="sre2l", resolutions=[32], stage_iterations=[5], lr=0.05,
                        jitter=4, r_bn=0.01)
    cfg.validate("recover")
    with strict_fp32():
        ref = recover(init, labels, [copy.deepcopy(teacher)], cfg, MEAN, STD, 32, seed=5,
                      device=CPU)
        out = recover(init, labels, [copy.deepcopy(teacher).to(dev)], cfg, MEAN, STD, 32,
                      seed=5, device=dev)
    assert_close(f"recover losses on {dev} vs CPU", out.losses, ref.losses, rtol=1e-4)
    if out.images.device.type != "cpu":
        raise AssertionError(f"recover returned images on {out.images.device}, not the CPU")
    assert_update_close(f"recover pixels on {dev} vs CPU", out.images, ref.images, init,
                        rtol=1e-3)


def check_bn_stats_match_cpu(device: str = "cuda") -> None:
    """BN-statistics hooks: the same means / variances (and gradients) on ``device`` as on
    the CPU.

    ``channel_stats`` on fp32 NCHW, fp32 channels_last and fp16 channels_last inputs against
    a float64 ``var_mean`` of the same values (rtol 1e-4; its custom backward within 1e-4 of
    float64 autograd, 5e-3 of the largest gradient for fp16); then, in a ResNet-18, the mean
    and variance every BN hook captures and every ``BNStatLoss`` term, device vs CPU in
    strict fp32 (rtol 1e-4, atol 1e-5); and with two problems per batch (groups 2), the
    terms (same tolerance) and their input gradient (rtol 1e-3, atol 1e-4 of the largest).
    """
    from fadrm.synthesis import BNStatLoss, channel_stats

    dev = _device(device)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 16, 12, 12, generator=gen) * 2 + 0.5
    shift = torch.randn(16, generator=gen)
    weights = torch.randn(2, 16, generator=gen)
    cases = [("fp32 NCHW", base, torch.contiguous_format),
             ("fp32 channels_last", base, torch.channels_last),
             ("fp16 channels_last", base.half(), torch.channels_last)]
    for label, values, layout in cases:
        ref_x = values.detach().double().clone().requires_grad_(True)
        ref_var, ref_mean = torch.var_mean(ref_x, dim=(0, 2, 3), correction=0)
        ((ref_mean - shift.double()) * weights[0] + ref_var * weights[1]).sum().backward()
        x = values.detach().to(dev).clone(memory_format=layout).requires_grad_(True)
        mean_off, var = channel_stats(x, shift.to(dev))
        if mean_off.dtype != torch.float32 or var.dtype != torch.float32:
            raise AssertionError(f"channel_stats ({label}) returned {mean_off.dtype}")
        assert_close(f"channel_stats mean ({label}, {dev})", mean_off,
                     ref_mean - shift.double(), rtol=1e-4, atol=1e-5)
        assert_close(f"channel_stats variance ({label}, {dev})", var, ref_var, rtol=1e-4)
        ((mean_off * weights[0].to(dev)) + var * weights[1].to(dev)).sum().backward()
        ref_grad = ref_x.grad
        atol = 5e-3 * float(ref_grad.abs().max()) if values.dtype == torch.float16 else 1e-6
        assert_close(f"channel_stats gradient ({label}, {dev})", x.grad.float(), ref_grad,
                     rtol=1e-4, atol=atol)

    teacher = calibrate_bn(resnet18(10, seed=0), seed=1)
    images = pixels(8, 32, seed=4)

    def capture(model: nn.Module, on: torch.device) -> tuple[list, list]:
        model = copy.deepcopy(model).to(on, memory_format=torch.channels_last).eval()
        stats: list = []

        def hook(module, inputs, _out):
            mean_off, var = channel_stats(inputs[0], module.running_mean)
            stats.append((mean_off.detach().cpu(), var.detach().cpu()))

        layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        handles = [m.register_forward_hook(hook) for m in layers]
        try:
            with BNStatLoss(model) as bn, torch.no_grad():
                model(images.to(on).contiguous(memory_format=torch.channels_last))
                terms = [t.detach().cpu() for t in bn.terms()]
        finally:
            for h in handles:
                h.remove()
        if len(stats) != len(layers) or len(terms) != len(layers):
            raise AssertionError(f"{len(layers)} BN layers but {len(stats)} hook calls and "
                                 f"{len(terms)} BNStatLoss terms on {on}")
        return stats, terms

    with strict_fp32():
        ref_stats, ref_terms = capture(teacher, CPU)
        stats, terms = capture(teacher, dev)
    for i, ((m, v), (rm, rv)) in enumerate(zip(stats, ref_stats)):
        assert_close(f"BN layer {i} captured mean on {dev} vs CPU", m, rm, rtol=1e-4,
                     atol=1e-5)
        assert_close(f"BN layer {i} captured variance on {dev} vs CPU", v, rv, rtol=1e-4,
                     atol=1e-5)
    assert_close(f"BNStatLoss terms on {dev} vs CPU", torch.stack(terms),
                 torch.stack(ref_terms), rtol=1e-4, atol=1e-5)

    def grouped(on: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Two problems in one batch (recover.ipc_per_forward 2): each half's terms, and the
        input gradient of their sum (one statistics call per layer for both halves)."""
        model = copy.deepcopy(teacher).to(on, memory_format=torch.channels_last).eval()
        model.requires_grad_(False)
        x = images.to(on).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with BNStatLoss(model, groups=2) as bn:
            model(x)
            loss = bn.loss()
        loss.sum().backward()
        return loss.detach().cpu(), x.grad.cpu()

    with strict_fp32():
        ref_loss, ref_grad = grouped(CPU)
        loss, grad = grouped(dev)
    assert_close(f"grouped BNStatLoss terms on {dev} vs CPU", loss, ref_loss, rtol=1e-4,
                 atol=1e-5)
    assert_close(f"grouped BNStatLoss input gradient on {dev} vs CPU", grad, ref_grad,
                 rtol=1e-3, atol=1e-4 * float(ref_grad.abs().max()))


def check_relabel_deterministic(device: str = "cuda") -> None:
    """Relabel logits identical across two runs on ``device`` (mixed precision, train-mode BN,
    two teachers); the teachers' weights and BN buffers untouched; and in fp32 the same
    views as on the CPU with logits within rtol 2e-3 + atol 2e-3 (two fp16 steps: they are
    stored as fp16)."""
    from fadrm.config import RelabelConfig
    from fadrm.formats.labels import soft_targets
    from fadrm.relabel import relabel_epochs

    dev = _device(device)
    images = uint8_images(24, 32, seed=5)
    teachers = [calibrate_bn(resnet18(10, seed=0), seed=1), convnet(10, seed=2)]
    cfg = RelabelConfig(epochs=2, batch_size=8, teacher_bn_mode="train", epochs_per_shard=2)
    cfg.validate("relabel")
    on_dev = [copy.deepcopy(t).to(dev) for t in teachers]
    before = [state_of(t) for t in on_dev]
    first = relabel_epochs(on_dev, images, MEAN, STD, cfg, range(2), seed=7, device=dev)
    second = relabel_epochs(on_dev, images, MEAN, STD, cfg, range(2), seed=7, device=dev)
    a, b = soft_targets(first, 10), soft_targets(second, 10)
    if not first.equals(second):
        raise AssertionError(
            f"relabel on {dev} is not deterministic: {int((a != b).sum())} of {a.numel()} "
            f"stored logits differ between two identical runs (max |diff| "
            f"{float((a - b).abs().max()):.3g})")
    for i, (t, state) in enumerate(zip(on_dev, before)):
        if any(p.device != dev for p in t.parameters()):
            raise AssertionError(f"teacher {i} left {dev} during relabel")
        after = state_of(t)
        changed = [k for k in state if not torch.equal(state[k], after[k])]
        if changed:
            raise AssertionError(f"relabel changed teacher {i}'s {changed[:3]}")

    with strict_fp32():
        dev32 = relabel_epochs(on_dev, images, MEAN, STD, cfg, range(2), seed=7, device=dev,
                               mixed_precision=False)
        cpu32 = relabel_epochs([copy.deepcopy(t) for t in teachers], images, MEAN, STD, cfg,
                               range(2), seed=7, device=CPU, mixed_precision=False)
    views = [n for n in cpu32.column_names if n != "logits"]
    if not dev32.select(views).equals(cpu32.select(views)):
        raise AssertionError(f"relabel views on {dev} differ from the CPU's")
    assert_close(f"relabel fp32 logits on {dev} vs CPU", soft_targets(dev32, 10),
                 soft_targets(cpu32, 10), rtol=2e-3, atol=2e-3)
    scale = float(soft_targets(dev32, 10).abs().max())
    assert_close(f"relabel mixed-precision logits vs fp32 on {dev}", a,
                 soft_targets(dev32, 10), rtol=0.0, atol=2e-2 * max(scale, 1.0))


def _student_data(num_classes: int = 4):
    from fadrm.config import RelabelConfig
    from fadrm.data import ImageSet
    from fadrm.relabel import relabel_epochs

    images = uint8_images(16, 32, seed=6)
    labels = torch.arange(16) % num_classes
    teacher = convnet(num_classes, seed=3)
    cfg = RelabelConfig(epochs=2, batch_size=8, epochs_per_shard=2)
    table = relabel_epochs([teacher], images, MEAN, STD, cfg, range(2), seed=3, device=CPU)
    val = ImageSet(images[:8], labels[:8], [f"c{i}" for i in range(num_classes)])
    return images, table, val


def check_student_step(device: str = "cuda") -> None:
    """One student epoch (two AdamW steps on stored views, KD loss) on ``device`` vs the CPU
    in fp32 with a ConvNet student: epoch loss within rtol 1e-4, weight update within 1e-3
    (relative L2). Then a ResNet-18 student in fp16 + GradScaler on ``device`` (the paper's
    ``execution.precision: fp16``, two epochs, four steps): finite loss, parameters (not BN
    buffers, which move even when the scaler skips every step) moved, still on the device
    and back in the plain memory layout."""
    from fadrm.config import StudentConfig
    from fadrm.models import ConvNet
    from fadrm.student import train_student

    dev = _device(device)
    images, table, val = _student_data()
    cfg = StudentConfig(model="convnet", lr=1e-3, temperature=1.0, accumulation_steps=1,
                        mixed_precision=False, eval_batch_size=8)
    cfg.validate("student")

    def run(student: nn.Module, on: torch.device, scfg: StudentConfig, epochs: int = 1,
            precision: str = "bf16") -> tuple[dict, dict]:
        model = copy.deepcopy(student)
        result = train_student(model, images, lambda _epoch: table, val, scfg, epochs, MEAN,
                               STD, 4, on, seed=0, precision=precision)
        for name, p in model.named_parameters():
            if p.device != on:
                raise AssertionError(f"student parameter {name} on {p.device}, expected {on}")
            if p.dim() == 4 and not p.is_contiguous():
                raise AssertionError(f"student parameter {name} left in channels_last")
        return result, model

    torch.manual_seed(2)
    small = ConvNet(4, 3, 32)
    with strict_fp32():
        ref, ref_model = run(small, CPU, cfg)
        out, model = run(small, dev, cfg)
    assert_close(f"student epoch loss on {dev} vs CPU", out["history"][0]["loss"],
                 ref["history"][0]["loss"], rtol=1e-4)
    assert_update_close(f"student weights on {dev} vs CPU", flat(state_of(model)),
                        flat(state_of(ref_model)), flat(state_of(small)), rtol=1e-3)

    big = resnet18(4, seed=2)
    amp, amp_model = run(big, dev, dataclasses.replace(cfg, mixed_precision=True), epochs=2,
                         precision="fp16")
    loss = amp["history"][-1]["loss"]
    if not math.isfinite(loss) or loss <= 0:
        raise AssertionError(f"mixed-precision student loss on {dev}: {loss}")
    moved = flat(params_of(amp_model)) - flat(params_of(big))
    if not bool(torch.isfinite(moved).all()) or float(moved.abs().max()) == 0.0:
        raise AssertionError(f"fp16 ResNet-18 student steps on {dev}: parameters "
                             "non-finite or unchanged (did the GradScaler skip every step?)")


def check_squeeze_step(device: str = "cuda") -> None:
    """One squeeze epoch (four SGD steps, on-device augmentation, the device image cache) on
    ``device`` vs the CPU in fp32 with a ConvNet: the update of weights and BN buffers within
    1e-3 (relative L2) of the CPU's. Then a ResNet-18 in fp16 + GradScaler: parameters (not
    BN buffers) moved and finite. The caller's training images stay on the CPU."""
    from fadrm.config import DataConfig, SqueezeConfig
    from fadrm.data import ImageSet
    from fadrm.models import ConvNet
    from fadrm.squeeze import train_teacher

    dev = _device(device)
    images = uint8_images(40, 32, seed=7)
    labels = torch.arange(40) % 4
    classes = ["a", "b", "c", "d"]
    train = ImageSet(images[:32], labels[:32], classes)
    val = ImageSet(images[32:], labels[32:], classes)
    data = DataConfig(root="synthetic", resolution=32, channels=3, mean=MEAN, std=STD)
    cfg = SqueezeConfig(epochs=1, batch_size=8, lr=0.05, mixed_precision=False)
    cfg.validate("squeeze")

    def run(teacher: nn.Module, on: torch.device, scfg: SqueezeConfig) -> tuple[float, nn.Module]:
        model = copy.deepcopy(teacher)
        top1 = train_teacher(model, train, val, scfg, data, on, seed=0)
        if not 0.0 <= top1 <= 100.0:
            raise AssertionError(f"squeeze top-1 on {on}: {top1}")
        return top1, model

    torch.manual_seed(3)
    small = ConvNet(4, 3, 32)
    with strict_fp32():
        _, ref_model = run(small, CPU, cfg)
        _, model = run(small, dev, cfg)
    assert_update_close(f"squeeze weights and BN buffers on {dev} vs CPU",
                        flat(state_of(model)), flat(state_of(ref_model)),
                        flat(state_of(small)), rtol=1e-3)
    if train.images.device.type != "cpu":
        raise AssertionError("squeeze moved the caller's training images")

    big = resnet18(4, seed=3)
    _, amp_model = run(big, dev, dataclasses.replace(cfg, mixed_precision=True))
    moved = flat(params_of(amp_model)) - flat(params_of(big))
    if not bool(torch.isfinite(moved).all()) or float(moved.abs().max()) == 0.0:
        raise AssertionError(f"fp16 ResNet-18 squeeze steps on {dev}: parameters non-finite "
                             "or unchanged (did the GradScaler skip every step?)")


def check_nccl_ddp(device: str = "cuda") -> None:
    """torch.distributed on one rank with the GPU backend, NCCL (gloo when rehearsed on CPU).

    fadrm does not pick a backend itself: on GPU workers Ray Train's ``TorchConfig`` defaults
    to NCCL, and squeeze / the student then wrap their model in DDP. Here: NCCL initialises
    (FileStore, world size 1) and is the reported backend; ``fadrm.training.world()`` sees
    it; ``all_reduce`` of a float32 and of a float64 device tensor (the student's epoch-loss
    reduction) is exact; one DDP step equals the same step without DDP (rtol 1e-5).
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fadrm.training import world

    dev = _device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_available():
        raise AssertionError("torch.distributed is not available in this torch build")
    if dist.is_initialized():
        raise AssertionError("a process group is already initialised in this process")
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        try:
            if dist.get_backend() != backend:
                raise AssertionError(f"backend is {dist.get_backend()}, expected {backend}")
            if world() != (0, 1):
                raise AssertionError(f"fadrm.training.world() = {world()}, expected (0, 1)")
            for dtype in (torch.float32, torch.float64):
                t = torch.arange(5, dtype=dtype, device=dev) + 0.25
                dist.all_reduce(t)
                if not torch.equal(t.cpu(), torch.arange(5, dtype=dtype) + 0.25):
                    raise AssertionError(f"{backend} all_reduce of {dtype}: {t.tolist()}")
            _ddp_step_equals_plain(dev, DistributedDataParallel)
        finally:
            dist.destroy_process_group()


def _ddp_step_equals_plain(dev: torch.device, ddp_class: type) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).to(dev)
    plain = copy.deepcopy(net)
    ids = [dev.index] if dev.type == "cuda" else None
    wrapped = ddp_class(net, device_ids=ids)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=gen).to(dev)
    y = (torch.arange(8) % 4).to(dev)
    with strict_fp32():
        for model, params in ((wrapped, net.parameters()), (plain, plain.parameters())):
            opt = torch.optim.SGD(params, lr=0.1)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        sync(dev)
    assert_close(f"DDP step on {dev} vs the same step without DDP", flat(state_of(net)),
                 flat(state_of(plain)), rtol=1e-5, atol=1e-6)


def check_cuda_device_without_gpu_fails() -> None:
    """``execution.device: cuda`` where no GPU is usable fails at once with the clear error
    (on a GPU machine ``torch.cuda.is_available`` is patched to False for the check): from
    ``resolve_device``, and from ``fadrm run CONFIG --executor local`` on valid data (a
    non-zero exit, the message on stderr, no stage run)."""
    import yaml

    from fadrm.amp import resolve_device
    from fadrm.cli import main

    with _cuda_hidden(), tempfile.TemporaryDirectory() as tmp:
        try:
            resolve_device("cuda")
        except RuntimeError as exc:
            if NO_DEVICE_MESSAGE not in str(exc):
                raise AssertionError(f"resolve_device('cuda') failed with {exc!r}") from exc
        else:
            raise AssertionError("resolve_device('cuda') succeeded without a CUDA device")
        root = os.path.join(tmp, "out")
        data = make_image_folder(Path(tmp) / "images", num_classes=2, per_class=3, size=16)
        cfg = tiny_cpu_config(Path(root), data, name="no-gpu")
        cfg["execution"]["device"] = "cuda"
        path = os.path.join(tmp, "no-gpu.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(["run", path, "--executor", "local", "--no-progress"])
        said = err.getvalue() + out.getvalue()
        if code == 0 or NO_DEVICE_MESSAGE not in said:
            raise AssertionError(f"fadrm run --executor local with execution.device cuda and "
                                 f"no GPU: exit {code}, output {said.strip()[-500:]!r}")
        ran = [name for name in ("squeeze", "select", "recover")
               if os.path.exists(os.path.join(root, name))]
        if ran:
            raise AssertionError(f"stages {ran} ran before the device error")


@contextlib.contextmanager
def _cuda_hidden() -> Iterator[None]:
    """``torch.cuda.is_available()`` returns False inside the block."""
    original = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        yield
    finally:
        torch.cuda.is_available = original


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Check:
    """A named check; ``needs_cuda`` ones take the device to test."""

    name: str
    run: Callable[..., None]
    needs_cuda: bool = True

    @property
    def summary(self) -> str:
        return (self.run.__doc__ or "").strip().splitlines()[0]


CHECKS: list[Check] = [
    Check("recover_step_matches_cpu", check_recover_step_matches_cpu),
    Check("fp16_recover_loop", check_fp16_recover_loop),
    Check("compiled_recover_matches_eager", check_compiled_recover_matches_eager),
    Check("steady_states_never_sync", check_steady_states_never_sync),
    Check("bn_stats_match_cpu", check_bn_stats_match_cpu),
    Check("relabel_deterministic", check_relabel_deterministic),
    Check("student_step", check_student_step),
    Check("squeeze_step", check_squeeze_step),
    Check("nccl_ddp", check_nccl_ddp),
    Check("cuda_device_without_gpu_fails", check_cuda_device_without_gpu_fails,
          needs_cuda=False),
]
