"""Part 5 of the check: speed at the paper's ImageNet-1K setting (preset ``imagenet1k-fadrm``).

The ``torch.mm`` peak in bf16 (the loops' default precision; the fractions refer to it);
recover seconds per image over a timed window, extrapolated to the preset's iterations
(beside the paper's 0.47 s on one RTX 4090), with peak GPU memory and the fraction of the mm
peak it reaches; the same for FADRM+ (preset ``imagenet1k-fadrm-plus``: its four teachers
round-robin; the paper: 1.09 s); relabel and student images per second. Each loop is timed
at the preset's ``execution.precision`` (bf16, the default) and again, in the same run, with
the paper's fp16 + GradScaler (``*_fp16_scaler``: today's code, only the precision
differs). Recover also runs the loop as it was before issue 23 (``old_path``:
:mod:`benchmarks.gpu.legacy`, fp16 + GradScaler, torch's Adam, per-iteration augmentation
copies, eager), the fair "before", and once more with several IPC indices per forward
(``recover.ipc_per_forward`` 2); relabel with 8 stored batches per forward
(``relabel.batches_per_forward``). Each benchmark is time-boxed by ``Sizes``; the recover
one leaves the preset and its teacher in a ``SpeedState`` for the others.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.gpu.common import (MATMUL_DTYPE, PAPER_GPU, PAPER_PLUS_S_PER_IMAGE,
                                   PAPER_S_PER_IMAGE, PRESET, PRESET_PLUS, Sizes, sync)

log = logging.getLogger("gpu_check")
NUM_CLASSES = 1000


def bench_matmul(device, sizes: Sizes) -> dict:
    """The best bf16 ``torch.mm`` rate on square matrices (FLOP/s), the peak for the
    fractions (bf16: the loops' default precision; on Hopper fp16 runs at the same rate)."""
    import torch

    dtype = getattr(torch, MATMUL_DTYPE)
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
    return {"dtype": MATMUL_DTYPE, "peak_tflops": peak / 1e12,
            "by_size_tflops": {str(n): r / 1e12 for n, r in rates.items()}}


@dataclass
class SpeedState:
    """What the recover benchmark leaves for the others: the preset and its teacher."""

    preset: Any = None
    teacher: Any = None


Timer = Callable[..., float]


def _recover_timer(device, preset, teachers: list, batch: int) -> Timer:
    """``run(stage_iterations, precision, groups, old)``: seconds of one recover call at the
    preset's setting on one block of ``batch`` random images (``old``: the loop as it was
    before issue 23, :func:`benchmarks.gpu.legacy.legacy_recover`)."""
    import torch

    from benchmarks.gpu.legacy import legacy_recover
    from fadrm.synthesis import recover

    rc, size = preset.recover, preset.data.resolution
    mean, std = preset.data.mean, preset.data.std
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(batch, 3, size, size, generator=gen).clamp(-2, 2)
    labels = torch.arange(batch) % NUM_CLASSES

    def run(iterations: list[int], precision: str = preset.execution.precision,
            groups: int = 1, old: bool = False) -> float:
        cfg = dataclasses.replace(rc, stage_iterations=iterations)
        x, y = (init, labels) if groups == 1 else (init.repeat(groups, 1, 1, 1),
                                                   labels.repeat(groups))
        sync(device)
        start = time.perf_counter()
        if old:
            legacy_recover(x, y, teachers, cfg, mean, std, size, seed=0, device=device)
        else:
            recover(x, y, teachers, cfg, mean, std, size,
                    seed=0 if groups == 1 else list(range(groups)), device=device,
                    precision=precision)
        sync(device)
        return time.perf_counter() - start
    return run


def _recover_preset(name: str, sizes: Sizes):
    """The preset's config, every recover stage at ``sizes.recover_resolution`` if set."""
    from fadrm.config import load_config

    preset = load_config(name)
    size = sizes.recover_resolution
    if size:
        preset.data = dataclasses.replace(preset.data, resolution=size)
        preset.recover = dataclasses.replace(
            preset.recover, resolutions=[size] * len(preset.recover.resolutions))
    return preset


def _window(full: list[int], seconds_per_iteration: float, budget_s: float,
            multiple: int) -> list[int]:
    """Per stage, the iterations to time: about 60 % of ``budget_s``, at least 2, a multiple
    of ``multiple`` (the teachers, so each gets its share of every stage), never more than
    the preset's."""
    fraction = min(1.0, 0.6 * budget_s / (seconds_per_iteration * sum(full)))
    least = max(2, multiple)
    return [min(n, max(least, multiple * round(n * fraction / multiple))) for n in full]


def _flops_per_iteration(run: Timer, full: list[int], teachers: int) -> tuple[float, list]:
    """Teacher FLOPs per iteration, averaged as the preset's iterations weight them: per
    stage, one iteration of each teacher at that stage's resolution."""
    from torch.utils.flop_counter import FlopCounterMode

    by_stage = []
    for i in range(len(full)):
        one = [0] * len(full)
        one[i] = teachers  # steps 0..K-1: each teacher once, round-robin
        with FlopCounterMode(display=False) as counter:
            run(one)
        by_stage.append(counter.get_total_flops() / teachers)
    return sum(f * n for f, n in zip(by_stage, full)) / sum(full), by_stage


def _timed_recover(device, run: Timer, full: list[int], budget_s: float, teachers: int,
                   mm_peak: float | None) -> dict:
    """Warm-up, a timed window of the default loop, its FLOP rate; the shared figures."""
    import torch

    stages = len(full)
    # Kernel selection and allocator warm-up: every teacher at every resolution.
    warmup = run([max(2, teachers)] * stages)
    estimate = run([max(2, teachers)] * stages) / (max(2, teachers) * stages)
    window = _window(full, estimate, budget_s, teachers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    seconds = run(window)
    peak_mib = working_mib = None
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        working_mib = peak_mib - base / 2**20
    per_iteration = seconds / sum(window)
    flops, by_stage = _flops_per_iteration(run, full, teachers)
    return {"timed_iterations": window, "warmup_seconds": warmup, "window_seconds": seconds,
            "seconds_per_iteration": per_iteration,
            "extrapolated_seconds_per_batch": seconds * sum(full) / sum(window),
            "peak_gpu_mib": peak_mib, "working_gpu_mib": working_mib,
            "gflop_per_iteration": flops / 1e9,
            "gflop_per_iteration_by_stage": [f / 1e9 for f in by_stage],
            "achieved_tflops": flops / per_iteration / 1e12, "mm_peak_dtype": MATMUL_DTYPE,
            "fraction_of_bf16_peak": flops / per_iteration / mm_peak if mm_peak else None}


def _variant(run: Timer, window: list[int], full: list[int], per_image: float, batch: int,
             precision: str, groups: int = 1, old: bool = False) -> dict:
    """One more way to run the same loop, warmed up, then timed over half the window."""
    stages = len(full)
    run([1] * stages, precision, groups, old)  # this variant's kernels (and graphs)
    half = [max(2, n // 2) for n in window]
    took = run(half, precision, groups, old)
    s_per_image = took * sum(full) / sum(half) / (batch * groups)
    return {"precision": precision, "ipc_per_forward": groups, "timed_iterations": half,
            "window_seconds": took, "seconds_per_iteration": took / sum(half),
            "seconds_per_image": s_per_image, "vs_default": s_per_image / per_image}


OLD_PATH = ("the recover loop before issue 23 (benchmarks/gpu/legacy.py): fp16 autocast + "
            "GradScaler (found_inf read every step), torch.optim.Adam (foreach), augmentation "
            "drawn and copied every iteration, the BN term as small autograd nodes per layer, "
            "eager, cudnn.benchmark off, one class block per forward")


def bench_recover(device, sizes: Sizes, state: SpeedState, mm_peak: float | None) -> dict:
    """Recover at the preset's ImageNet-1K setting over a timed window, extrapolated; the
    old loop, fp16 + GradScaler and 2 IPC indices per forward beside it."""
    import torch

    from fadrm.models import create_model

    preset = _recover_preset(PRESET, sizes)
    rc = preset.recover
    batch = sizes.recover_batch or rc.class_block_size or 100
    size = preset.data.resolution
    torch.manual_seed(0)
    teacher = create_model(preset.teachers[0].model, NUM_CLASSES, 3, size).to(device).eval()
    if not sizes.recover_resolution:  # the others run at the preset's resolution
        state.preset, state.teacher = preset, teacher
    run = _recover_timer(device, preset, [teacher], batch)
    full = list(rc.stage_iterations)
    timed = _timed_recover(device, run, full, sizes.recover_budget_s, 1, mm_peak)
    total = timed["extrapolated_seconds_per_batch"]
    out = {
        "preset": PRESET, "teacher": preset.teachers[0].model, "classes": NUM_CLASSES,
        "batch": batch, "resolutions": list(rc.resolutions), "preset_iterations": full,
        "method": rc.method, "mixed_precision": rc.spec.mixed_precision,
        "precision": preset.execution.precision, **timed,
        "seconds_per_image": total / batch,
        "paper_seconds_per_image": PAPER_S_PER_IMAGE, "paper_gpu": PAPER_GPU,
        "vs_paper": (total / batch) / PAPER_S_PER_IMAGE,
    }
    # The same block with the old loop, today's loop at the paper's fp16 + GradScaler, and
    # 2 IPC indices per forward (2 x batch images per iteration), each over half the window.
    window, per_image = timed["timed_iterations"], out["seconds_per_image"]
    out["old_path"] = {**_variant(run, window, full, per_image, batch, "fp16", old=True),
                       "what": OLD_PATH}
    out["fp16_scaler"] = _variant(run, window, full, per_image, batch, "fp16")
    out["ipc_per_forward_2"] = _variant(run, window, full, per_image, batch,
                                        preset.execution.precision, groups=2)
    log.info("   recover: %.3f s/image extrapolated to %d iterations (paper: %.2f s on one "
             "%s; the old loop: %.3f s), %.1f ms/iteration, peak %s MiB",
             out["seconds_per_image"], sum(full), PAPER_S_PER_IMAGE, PAPER_GPU,
             out["old_path"]["seconds_per_image"], out["seconds_per_iteration"] * 1e3,
             f"{out['peak_gpu_mib']:.0f}" if out["peak_gpu_mib"] is not None else "-")
    return out


def bench_recover_plus(device, sizes: Sizes, mm_peak: float | None) -> dict:
    """FADRM+ recover (preset ``imagenet1k-fadrm-plus``: its four teachers round-robin, one
    per iteration) over a timed window, extrapolated, at the default precision."""
    import torch

    from fadrm.models import create_model

    preset = _recover_preset(PRESET_PLUS, sizes)
    rc = preset.recover
    batch = sizes.recover_batch or rc.class_block_size or 100
    size = preset.data.resolution
    names = [preset.teachers[i].model for i in preset.recover_teachers]
    torch.manual_seed(0)
    teachers = [create_model(name, NUM_CLASSES, 3, size).to(device).eval() for name in names]
    run = _recover_timer(device, preset, teachers, batch)
    full = list(rc.stage_iterations)
    timed = _timed_recover(device, run, full, sizes.recover_plus_budget_s, len(teachers),
                           mm_peak)
    per_image = timed["extrapolated_seconds_per_batch"] / batch
    out = {"preset": PRESET_PLUS, "teachers": names, "classes": NUM_CLASSES, "batch": batch,
           "resolutions": list(rc.resolutions), "preset_iterations": full,
           "method": rc.method, "precision": preset.execution.precision, **timed,
           "seconds_per_image": per_image, "paper_seconds_per_image": PAPER_PLUS_S_PER_IMAGE,
           "paper_gpu": PAPER_GPU, "vs_paper": per_image / PAPER_PLUS_S_PER_IMAGE}
    log.info("   recover FADRM+: %.3f s/image extrapolated (paper: %.2f s on one %s), "
             "%.1f ms/iteration", per_image, PAPER_PLUS_S_PER_IMAGE, PAPER_GPU,
             timed["seconds_per_iteration"] * 1e3)
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

