"""Checks of the hot loops' GPU paths (issue 23): the paper's fp16 recover, the compiled
recover and the sync-free steady states. Plain functions, as in
:mod:`benchmarks.gpu.cuda_checks` (which lists them in its ``CHECKS``); ``"cpu"`` rehearses
a check on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from benchmarks.gpu.common import MEAN, STD
from benchmarks.gpu.compare import (assert_close, calibrate_bn, convnet, pixels, resnet18,
                                    strict_fp32, uint8_images)

__all__ = ["check_compiled_recover_matches_eager", "check_fp16_recover_loop",
           "check_steady_states_never_sync"]


def _device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@contextlib.contextmanager
def _compile_backend(dev: torch.device) -> Iterator[None]:
    """On the CPU (a rehearsal) torch.compile traces with the ``aot_eager`` backend: the same
    capture (dynamo, dynamic=False, one graph per resolution) in seconds instead of the
    minutes inductor's C++ build takes on two cores. On CUDA: inductor, as recover runs."""
    if dev.type == "cuda":
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend="aot_eager")
    try:
        yield
    finally:
        torch.compile = original


def check_fp16_recover_loop(device: str = "cuda") -> None:
    """The paper's fp16 recover loop (``execution.precision: fp16``; method fadrm, MRO
    24 -> 32 px, 40 iterations).

    On CUDA the teacher must run in fp16 under an enabled GradScaler (bf16, no scaler on the
    CPU); every loss finite, and the mean of the last 5 losses below 0.95 x the first 5.
    Augmentation is off (whole-image crops, no flip or shift), so the loss depends on the
    pixels alone and a random teacher's loss falls steadily (by ~12 % in bf16 on the CPU).
    """
    from fadrm import synthesis
    from fadrm.config import RecoverConfig

    dev = _device(device)
    teacher = calibrate_bn(resnet18(10, seed=0), seed=1).to(dev)
    init = pixels(16, 32, seed=3)
    labels = torch.arange(16) % 10
    cfg = RecoverConfig(method="fadrm", resolutions=[24, 32], stage_iterations=[10, 30],
                        lr=0.1, jitter=0, crop_scale=[1.0, 1.0], flip=False)
    cfg.validate("recover")
    seen: dict = {}
    original = synthesis.grad_scaler

    def spy(device_: torch.device, enabled: bool = True, precision: str = "fp16"):
        seen["scaler"] = original(device_, enabled, precision)
        return seen["scaler"]

    first_conv = next(m for m in teacher.modules() if isinstance(m, nn.Conv2d))

    def record_dtype(_module, _inputs, out) -> None:
        seen.setdefault("dtype", out.dtype)

    handle = first_conv.register_forward_hook(record_dtype)
    synthesis.grad_scaler = spy
    try:
        result = synthesis.recover(init, labels, [teacher], cfg, MEAN, STD, 32, seed=0,
                                   device=dev, precision="fp16")
    finally:
        synthesis.grad_scaler = original
        handle.remove()
    want = torch.float16 if dev.type == "cuda" else torch.bfloat16
    if seen.get("dtype") != want:
        raise AssertionError(f"teacher convolutions ran in {seen.get('dtype')}, expected "
                             f"{want} under recover's autocast on {dev.type}")
    scaler = seen.get("scaler")
    if scaler is None:
        raise AssertionError("recover did not create a GradScaler")
    if dev.type == "cuda":
        if not scaler.is_enabled():
            raise AssertionError("the GradScaler of fp16 recover on CUDA is disabled")
        scale = float(scaler.get_scale())
        if not math.isfinite(scale) or scale <= 0:
            raise AssertionError(f"GradScaler scale is {scale}")
    losses = torch.tensor(result.losses)
    if len(losses) != 40 or not bool(torch.isfinite(losses).all()):
        raise AssertionError(f"recover losses: {result.losses}")
    first, last = float(losses[:5].mean()), float(losses[-5:].mean())
    if not last < 0.95 * first:
        raise AssertionError(f"fp16 recover did not lower the loss: first 5 mean {first:.4f}, "
                             f"last 5 mean {last:.4f}")
    if not bool(torch.isfinite(result.images).all()):
        raise AssertionError("fp16 recover produced non-finite pixels")


def check_compiled_recover_matches_eager(device: str = "cuda") -> None:
    """recover with ``recover.compile: true`` (torch.compile, dynamic=False) gives the eager
    result in fp32: 2 MRO stages x 3 iterations, losses within rtol 1e-4, pixels within
    atol 1e-4 (normalised units)."""
    from fadrm.config import RecoverConfig
    from fadrm.synthesis import recover

    dev = _device(device)
    teacher = convnet(10, seed=0)
    init = pixels(10, 32, seed=2)
    cfg = RecoverConfig(method="fadrm", resolutions=[32, 24], stage_iterations=[3, 3],
                        lr=0.05, jitter=4, crop_scale=[0.5, 1.0])
    out = {}
    with strict_fp32(), _compile_backend(dev):
        for compiled in (False, True):
            # A fresh teacher each time: recover caches the compiled module on the teacher.
            out[compiled] = recover(init, torch.arange(10), [copy.deepcopy(teacher).to(dev)],
                                    dataclasses.replace(cfg, compile=compiled), MEAN, STD, 32,
                                    seed=1, device=dev, precision="fp32")
    if getattr(teacher, "_fadrm_compiled", None) is not None:
        raise AssertionError("the compiled module leaked onto the caller's teacher")
    assert_close(f"compiled recover losses on {dev} vs eager", torch.tensor(out[True].losses),
                 torch.tensor(out[False].losses), rtol=1e-4)
    assert_close(f"compiled recover pixels on {dev} vs eager", out[True].images,
                 out[False].images, rtol=0.0, atol=1e-4)


@contextlib.contextmanager
def _sync_errors(dev: torch.device) -> Iterator[None]:
    """On CUDA any host sync inside the block raises (CUDA's own detector); on the CPU (a
    rehearsal) there is no device to wait for and the block just runs."""
    if dev.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _strict(fn: Callable, dev: torch.device) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _sync_errors(dev):
            return fn(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def _steady_states_strict(dev: torch.device) -> Iterator[None]:
    """Every steady-state step of recover, relabel and the student under
    :func:`_sync_errors`; the every-N finiteness reads pushed out of the window."""
    import fadrm.relabel
    import fadrm.render
    import fadrm.student
    import fadrm.synthesis

    patches = [
        (fadrm.synthesis, "_PROGRESS_EVERY", 10**9),
        (fadrm.student, "_CHECK_EVERY", 10**9),
        (fadrm.synthesis, "_iteration", _strict(fadrm.synthesis._iteration, dev)),
        (fadrm.relabel, "_label_batch", _strict(fadrm.relabel._label_batch, dev)),
        (fadrm.relabel, "_label_batches", _strict(fadrm.relabel._label_batches, dev)),
        (fadrm.render.EpochViews, "render", _strict(fadrm.render.EpochViews.render, dev)),
        (fadrm.student, "_train_step", _strict(fadrm.student._train_step, dev)),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def check_steady_states_never_sync(device: str = "cuda") -> None:
    """The steady states of recover, relabel and the student read nothing from the device:
    each step under ``torch.cuda.set_sync_debug_mode("error")``, in bf16 (the default) and
    fp16 + GradScaler (the paper's), with their finiteness checks left to the ends; also
    recover with two IPC indices per forward and relabel with two batches per forward."""
    from fadrm.config import RecoverConfig, RelabelConfig, StudentConfig
    from fadrm.data import ImageSet
    from fadrm.relabel import relabel_epochs
    from fadrm.student import train_student
    from fadrm.synthesis import recover

    dev = _device(device)
    teacher = convnet(10, seed=0).to(dev)
    cfg = RecoverConfig(method="fadrm", resolutions=[32, 24], stage_iterations=[5, 5],
                        lr=0.05, jitter=4)
    images = uint8_images(40, 32, seed=3)
    val = ImageSet(images[:10], torch.arange(10), [str(i) for i in range(10)])
    for precision in ("bf16", "fp16"):
        with _steady_states_strict(dev):
            res = recover(pixels(10, 32, seed=2).to(dev), torch.arange(10, device=dev),
                          [teacher], cfg, MEAN, STD, 32, seed=1, device=dev,
                          precision=precision)
            grouped = recover(pixels(20, 32, seed=2).to(dev), torch.arange(20, device=dev) % 10,
                              [teacher], cfg, MEAN, STD, 32, seed=[1, 2], device=dev,
                              precision=precision)
            table = relabel_epochs([teacher], images, MEAN, STD, RelabelConfig(batch_size=10),
                                   range(2), seed=0, device=dev, precision=precision)
            ghost = relabel_epochs([teacher], images, MEAN, STD, RelabelConfig(batch_size=10),
                                   range(2), seed=0, device=dev, precision=precision,
                                   batches_per_forward=2)
            out = train_student(convnet(10, seed=4), images, lambda e: table, val,
                                StudentConfig(model="convnet", eval_every=0), 2, MEAN, STD,
                                10, dev, seed=0, precision=precision)
        if len(res.losses) != 10 or len(grouped.group_losses) != 2 or out["steps"] != 8:
            raise AssertionError(f"{precision}: {len(res.losses)} recover iterations, "
                                 f"{len(grouped.group_losses)} groups, {out['steps']} student "
                                 "steps (expected 10, 2 and 8)")
        if ghost.num_rows != table.num_rows:
            raise AssertionError(f"{precision}: relabel with 2 batches per forward stored "
                                 f"{ghost.num_rows} rows, one at a time {table.num_rows}")
