"""Part 5 of the check: speed at the paper's ImageNet-1K setting (preset ``imagenet1k-fadrm``).

The ``torch.mm`` peak; recover seconds per image over a timed window, extrapolated to the
preset's iterations (beside the paper's 0.47 s on one RTX 4090), with peak GPU memory and the
fraction of the measured mm peak it reaches; relabel and student images per second. Each
loop is timed at the preset's ``execution.precision`` (bf16, the default) and again, in the
same run, with the paper's fp16 + GradScaler (``*_fp16_scaler``: the same code, only the
precision differs), and recover / relabel once more with several IPC indices / stored
batches per forward (``recover.ipc_per_forward`` 2, ``relabel.batches_per_forward`` 8).
Each benchmark is time-boxed by ``Sizes``; the recover one leaves the preset and its teacher
in a ``SpeedState`` for the others.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.gpu.common import PAPER_GPU, PAPER_S_PER_IMAGE, PRESET, Sizes, sync

log = logging.getLogger("gpu_check")


def bench_matmul(device, sizes: Sizes) -> dict:
    """The best ``torch.mm`` rate on square matrices (FLOP/s), the peak for the fractions."""
    import torch

    dtype = getattr(torch, sizes.matmul_dtype)
    rates = {}
    for n in sizes.matmul_sizes:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        out = torch.mm(a, b)
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        once = max(time.perf_counter() - start, 1e-6)
        reps = max(3, min(200, int(0.25 / once)))
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            sync(device)
            best = min(best, (time.perf_counter() - start) / reps)
        rates[n] = 2 * n**3 / best
        del a, b, out
    peak = max(rates.values())
    return {"dtype": sizes.matmul_dtype, "peak_tflops": peak / 1e12,
            "by_size_tflops": {str(n): r / 1e12 for n, r in rates.items()}}


@dataclass
class SpeedState:
    """What the recover benchmark leaves for the others: the preset and its teacher."""

    preset: Any = None
    teacher: Any = None


def bench_recover(device, sizes: Sizes, state: SpeedState, fp16_peak: float | None) -> dict:
    """Recover at the preset's ImageNet-1K setting over a timed window, extrapolated."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fadrm.config import load_config
    from fadrm.models import create_model
    from fadrm.synthesis import recover

    preset = load_config(PRESET)
    rc = preset.recover
    num_classes = 1000
    batch = sizes.recover_batch or rc.class_block_size or 100
    size = preset.data.resolution
    torch.manual_seed(0)
    teacher = create_model(preset.teachers[0].model, num_classes, 3, size).to(device).eval()
    state.preset, state.teacher = preset, teacher
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(batch, 3, size, size, generator=gen).clamp(-2, 2)
    labels = torch.arange(batch) % num_classes
    full = list(rc.stage_iterations)

    def run(iterations: list[int], precision: str = preset.execution.precision,
            groups: int = 1) -> float:
        cfg = dataclasses.replace(rc, stage_iterations=iterations)
        x, y = (init, labels) if groups == 1 else (init.repeat(groups, 1, 1, 1),
                                                   labels.repeat(groups))
        sync(device)
        start = time.perf_counter()
        recover(x, y, [teacher], cfg, preset.data.mean, preset.data.std, size,
                seed=0 if groups == 1 else list(range(groups)), device=device,
                precision=precision)
        sync(device)
        return time.perf_counter() - start

    stages = len(full)
    warmup = run([1] * stages)  # kernel selection and allocator warm-up at every resolution
    estimate = run([2] * stages) / (2 * stages)
    fraction = min(1.0, 0.6 * sizes.recover_budget_s / (estimate * sum(full)))
    window = [max(2, min(n, round(n * fraction))) for n in full]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    seconds = run(window)
    peak_mib = working_mib = None
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        working_mib = peak_mib - base / 2**20
    per_iteration = seconds / sum(window)
    total = seconds * sum(full) / sum(window)

    flops = []
    for i in range(stages):  # one iteration at each stage's resolution
        one = [0] * stages
        one[i] = 1
        with FlopCounterMode(display=False) as counter:
            run(one)
        flops.append(counter.get_total_flops())
    flops_per_iteration = sum(f * n for f, n in zip(flops, full)) / sum(full)
    rate = flops_per_iteration / per_iteration
    out = {
        "preset": PRESET, "teacher": preset.teachers[0].model, "classes": num_classes,
        "batch": batch, "resolutions": list(rc.resolutions), "preset_iterations": full,
        "timed_iterations": window, "method": rc.method,
        "mixed_precision": rc.spec.mixed_precision,
        "precision": preset.execution.precision, "warmup_seconds": warmup,
        "window_seconds": seconds, "seconds_per_iteration": per_iteration,
        "extrapolated_seconds_per_batch": total,
        "seconds_per_image": total / batch,
        "paper_seconds_per_image": PAPER_S_PER_IMAGE, "paper_gpu": PAPER_GPU,
        "vs_paper": (total / batch) / PAPER_S_PER_IMAGE,
        "peak_gpu_mib": peak_mib, "working_gpu_mib": working_mib,
        "gflop_per_iteration": flops_per_iteration / 1e9,
        "gflop_per_iteration_by_stage": [f / 1e9 for f in flops],
        "achieved_tflops": rate / 1e12,
        "fraction_of_fp16_peak": rate / fp16_peak if fp16_peak else None,
    }
    # The same loop with the paper's fp16 + GradScaler, and with 2 IPC indices per forward
    # (2 x batch images per iteration), each over a window half as long.
    half = [max(2, n // 2) for n in window]
    for name, precision, groups in (("fp16_scaler", "fp16", 1), ("ipc_per_forward_2",
                                                                   preset.execution.precision, 2)):
        run([1] * stages, precision, groups)  # this variant's kernels and graphs
        took = run(half, precision, groups)
        per_image = took * sum(full) / sum(half) / (batch * groups)
        out[name] = {"precision": precision, "ipc_per_forward": groups,
                     "timed_iterations": half, "window_seconds": took,
                     "seconds_per_iteration": took / sum(half), "seconds_per_image": per_image,
                     "vs_default": per_image / out["seconds_per_image"]}
    log.info("   recover: %.3f s/image extrapolated to %d iterations (paper: %.2f s on one "
             "%s), %.1f ms/iteration, peak %s MiB", out["seconds_per_image"], sum(full),
             PAPER_S_PER_IMAGE, PAPER_GPU, per_iteration * 1e3,
             f"{peak_mib:.0f}" if peak_mib is not None else "-")
    return out


def _speed_state(device, state: SpeedState):
    """The preset and a ResNet-18 teacher (from the recover benchmark, or built here)."""
    import torch

    from fadrm.config import load_config
    from fadrm.models import create_model

    if state.preset is None:
        state.preset = load_config(PRESET)
    if state.teacher is None:
        torch.manual_seed(0)
        state.teacher = create_model(state.preset.teachers[0].model, 1000, 3,
                                     state.preset.data.resolution).to(device).eval()
    return state.preset, state.teacher


def _random_images(n: int, size: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def bench_relabel(device, sizes: Sizes, state: SpeedState) -> dict:
    """Relabel images per second with the preset's relabel settings and teacher."""
    from fadrm.relabel import relabel_epochs

    preset, teacher = _speed_state(device, state)
    rcfg = preset.relabel
    images = _random_images(sizes.relabel_images, preset.data.resolution, seed=2)
    n = len(images)

    def run(epochs: range, precision: str = preset.execution.precision,
            cfg=rcfg) -> tuple[float, Any]:
        sync(device)
        start = time.perf_counter()
        table = relabel_epochs([teacher], images, preset.data.mean, preset.data.std, cfg,
                               epochs, seed=0, device=device, precision=precision)
        sync(device)
        return time.perf_counter() - start, table

    first, _ = run(range(1))  # warm-up, and the size of the timed window
    epochs = max(1, min(10, int(sizes.relabel_budget_s * 0.4 / max(first, 1e-3))))
    seconds, _ = run(range(1, 1 + epochs))
    out = {"teacher": preset.teachers[0].model, "images": n, "batch": rcfg.batch_size,
           "teacher_bn_mode": rcfg.teacher_bn_mode, "precision": preset.execution.precision,
           "epochs": epochs, "seconds": seconds, "images_per_s": n * epochs / seconds}
    # The paper's fp16 + GradScaler, then 8 stored batches per teacher forward (ghost BN),
    # each over half the epochs.
    short = range(1, 1 + max(1, epochs // 2))
    for name, precision, per_forward in (("fp16_scaler", "fp16", 1), (
            "batches_per_forward_8", preset.execution.precision, 8)):
        cfg = dataclasses.replace(rcfg, batches_per_forward=per_forward)
        run(range(1), precision, cfg)  # warm-up
        took, _ = run(short, precision, cfg)
        out[name] = {"precision": precision, "batches_per_forward": per_forward,
                     "epochs": len(short), "seconds": took,
                     "images_per_s": n * len(short) / took}
    return out


def bench_student(device, sizes: Sizes, state: SpeedState) -> dict:
    """Student images per second at the preset's batch (relabel batch, accumulation)."""
    import torch

    from fadrm.data import ImageSet
    from fadrm.models import create_model
    from fadrm.relabel import relabel_epochs
    from fadrm.student import train_student

    preset, teacher = _speed_state(device, state)
    size, num_classes = preset.data.resolution, 1000
    images = _random_images(sizes.student_images, size, seed=3)
    n = len(images)
    table = relabel_epochs([teacher], images, preset.data.mean, preset.data.std,
                           preset.relabel, range(4), seed=0, device=device)
    val = ImageSet(images[:16], torch.arange(16) % num_classes,
                   [f"c{i}" for i in range(num_classes)])
    cfg = dataclasses.replace(preset.student, eval_every=0, eval_batch_size=16)

    def run(num_epochs: int, precision: str = preset.execution.precision) -> float:
        torch.manual_seed(0)
        model = create_model(preset.student.model, num_classes, 3, size).to(device)
        result = train_student(model, images, lambda _epoch: table, val, cfg, num_epochs,
                               preset.data.mean, preset.data.std, num_classes, device, seed=0,
                               precision=precision)
        if not math.isfinite(result["history"][-1]["loss"]):
            raise AssertionError(f"student loss {result['history'][-1]['loss']}")
        return result["seconds"]

    first = run(1)  # warm-up, and the size of the timed window
    epochs = max(1, min(4, int(sizes.student_budget_s * 0.4 / max(first, 1e-3))))
    seconds = run(epochs)
    steps = epochs * -(-n // preset.relabel.batch_size)  # one step per stored batch
    out = {"model": preset.student.model, "images": n, "batch": preset.relabel.batch_size,
           "accumulation_steps": cfg.accumulation_steps,
           "mixed_precision": cfg.mixed_precision, "precision": preset.execution.precision,
           "epochs": epochs, "seconds": seconds, "images_per_s": n * epochs / seconds,
           "ms_per_step": 1e3 * seconds / steps}
    # The paper's fp16 + GradScaler over half the epochs (seconds include the final
    # evaluation of 16 images, as above).
    short = max(1, epochs // 2)
    run(1, "fp16")  # warm-up
    took = run(short, "fp16")
    out["fp16_scaler"] = {"precision": "fp16", "epochs": short, "seconds": took,
                          "images_per_s": n * short / took,
                          "ms_per_step": 1e3 * took / (short * -(-n // preset.relabel.batch_size))}
    return out

