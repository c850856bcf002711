"""Distance to the hardware limit: recover's teacher FLOP rate against the matmul peak.

    python -m benchmarks.hardware_limit            # default size (~15 min on 2 CPU cores)
    python -m benchmarks.hardware_limit --quick    # smoke size (~2 min, no torch.compile)

Full-size runs write ``benchmarks/results/hardware_limit.{json,md}`` (committed, quoted by
benchmarks/README.md); ``--quick`` runs write ``benchmarks/work/results-quick/`` instead, so
a smoke run never replaces the published numbers (``--results DIR`` picks the folder).

Setting: 32 px, ResNet-18 small-image teacher (``create_model("resnet18", 100, 3, 32)``),
batch 100 (one image per class), 4 stages at 32 px. The teacher's forward + backward FLOPs
of one recover iteration are counted with ``torch.utils.flop_counter.FlopCounterMode``
(convolutions and matmuls; the backward computes input gradients only, the teacher is
frozen), and divided by the measured wall time per iteration of the real
``fadrm.synthesis.recover`` (everything included: augmentation, BN-statistics loss, Adam,
clamping). The peak is this machine's ``torch.mm`` rate on square matrices in bf16 and fp32
(the best of several sizes), measured in the same run with the same thread count, before
and after the variants; the higher counts, so the fractions are not flattered by a slow
peak measurement.

Variants (all the real recover, toggled through its settings or, for the two knobs that
are not settings, by patching ``fadrm.bn_stats`` / ``fadrm.synthesis`` in this process):

* precision: fp32 (method sre2l) vs bf16 autocast around the teacher forward (fadrm);
* memory layout: ``recover.channels_last`` on / off;
* BN statistics: the shipped fused path, the textbook ``var_mean`` hook, none (r_bn = 0);
* augmentation: per-sample crop/flip/roll (shipped, one grid_sample) vs none;
* ``recover.compile`` (default size only: compiling ResNet-18 costs ~1.5 min on this CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

from benchmarks import common

NAME = "hardware_limit"
TARGET = 0.40  # of the bf16 matmul peak

# name: (method, channels_last, bn, augmentation, compile)
VARIANTS = {
    "fp32, NCHW": ("sre2l", False, "fused", "per-sample", False),
    "fp32, channels_last": ("sre2l", True, "fused", "per-sample", False),
    "bf16, NCHW": ("fadrm", False, "fused", "per-sample", False),
    "bf16, channels_last (shipped default)": ("fadrm", True, "fused", "per-sample", False),
    "bf16, channels_last, var_mean BN hook": ("fadrm", True, "var_mean", "per-sample", False),
    "bf16, channels_last, no BN loss": ("fadrm", True, "none", "per-sample", False),
    "bf16, channels_last, no augmentation": ("fadrm", True, "fused", "none", False),
    "bf16, channels_last, torch.compile": ("fadrm", True, "fused", "per-sample", True),
}
DEFAULT = "bf16, channels_last (shipped default)"


def matmul_rate(dtype, n: int, repeats: int) -> float:
    """Median FLOP/s of ``torch.mm`` on ``n x n`` matrices (after a warm-up)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    secs = common.timed(lambda: torch.mm(a, b), repeats, warmup=1)
    return 2 * n**3 / common.median(secs)


def matmul_peak(dtype, sizes: tuple[int, ...], repeats: int) -> tuple[float, dict]:
    """The best median ``torch.mm`` rate over square sizes (the kernels peak at different
    sizes), and every size's rate."""
    rates = {n: matmul_rate(dtype, n, repeats) for n in sizes}
    return max(rates.values()), rates


def teacher_flops(teacher, batch: int, size: int, mixed_precision: bool) -> int:
    """Forward + backward FLOPs of one recover iteration's teacher pass (input grads)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from fadrm.amp import autocast

    x = torch.randn(batch, 3, size, size, requires_grad=True)
    flags = [p.requires_grad for p in teacher.parameters()]
    teacher.requires_grad_(False)  # frozen, as in recover: no weight gradients
    try:
        with FlopCounterMode(display=False) as counter:
            with autocast(torch.device("cpu"), mixed_precision):
                out = teacher(x.contiguous(memory_format=torch.channels_last))
            F.cross_entropy(out.float(), torch.arange(batch) % out.shape[1]).backward()
    finally:
        for p, flag in zip(teacher.parameters(), flags):
            p.requires_grad_(flag)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _patched(bn: str, aug: str):
    """Swap the BN-statistics term (of fadrm.bn_stats, which recover's hooks call) or the
    augmentation's sampling of fadrm.synthesis."""
    import torch

    from fadrm import bn_stats, synthesis

    saved = bn_stats.bn_term, synthesis.sample_grid
    if bn == "var_mean":
        def var_mean_term(x, layer, weight, groups=1):
            # The textbook hook: autograd through var_mean of an fp32 copy (one group).
            var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
            term = (torch.linalg.vector_norm(mean - layer.running_mean)
                    + torch.linalg.vector_norm(var - layer.running_var))
            return term * weight
        bn_stats.bn_term = var_mean_term
    if aug == "none":
        synthesis.sample_grid = lambda x, gx, gy: synthesis.resample(x, gx.shape[-1])
    try:
        yield
    finally:
        bn_stats.bn_term, synthesis.sample_grid = saved


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    results = common.results_dir(args.quick, args.results)
    threads = common.set_threads(args.threads)
    info = common.machine_info()
    per_stage = args.iterations or (1 if args.quick else 5)
    repeats = args.repeats or (2 if args.quick else 3)
    with_compile = args.compile if args.compile is not None else not args.quick
    peaks = _Peaks(((1024, 2048), 3) if args.quick else ((1024, 2048, 4096), 5))
    started = time.perf_counter()

    peaks.measure()
    print(f"[{NAME}] matmul peak: bf16 {peaks.rates['bf16'][0] / 1e9:.1f}, fp32 "
          f"{peaks.rates['fp32'][0] / 1e9:.1f} GFLOP/s", flush=True)
    names = [n for n in VARIANTS if with_compile or not VARIANTS[n][4]]
    flops, per_iter, compile_seconds = _time_variants(names, per_stage, repeats)
    peaks.measure()

    rows = _rows(per_iter, flops, peaks)
    # The headline is the fastest complete recover (all of CE + BN loss + augmentation).
    complete = [n for n in names if VARIANTS[n][2] != "none" and VARIANTS[n][3] != "none"]
    best = min(complete, key=lambda n: rows[n]["seconds_per_iteration"])
    out = {
        "quick": args.quick, "machine": info, "threads": threads,
        "setting": {"model": "resnet18 (small-image stem)", "classes": CLASSES, "batch": BATCH,
                    "resolution": SIZE, "stages": 4, "iterations_per_stage": per_stage,
                    "repeats": repeats},
        "best_setting": best, "shipped_default": DEFAULT,
        "fraction_of_bf16_peak": rows[best]["fraction_of_bf16_peak"],
        "fraction_of_fp32_peak": rows[best]["fraction_of_fp32_peak"],
        "default_fraction_of_bf16_peak": rows[DEFAULT]["fraction_of_bf16_peak"],
        "target_fraction_of_bf16_peak": TARGET,
        "met": rows[best]["fraction_of_bf16_peak"] >= TARGET,
        "matmul_peak_gflops": peaks.summary(),
        "teacher_gflop_per_iteration": {k: v / 1e9 for k, v in flops.items()},
        "compile_seconds": compile_seconds,
        "variants": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    _write(out, peaks, results)
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (all cores)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="recover iterations per stage per timed run (4 stages)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="include the torch.compile variant (default: not with --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--results", default=None, metavar="DIR",
                        help="results folder (default: benchmarks/results, or "
                             "benchmarks/work/results-quick with --quick)")
    return parser.parse_args(argv)


BATCH, SIZE, CLASSES = 100, 32, 100
MEAN, STD = [0.507, 0.487, 0.441], [0.267, 0.256, 0.276]


class _Peaks:
    """The bf16 and fp32 ``torch.mm`` peaks, measured before and after the variants (the
    higher counts)."""

    def __init__(self, sizes_and_repeats: tuple[tuple[int, ...], int]):
        self.sizes, self.repeats = sizes_and_repeats
        self.rates: dict[str, list[float]] = {"bf16": [], "fp32": []}
        self.by_size: dict[str, list] = {"bf16": [], "fp32": []}

    def measure(self) -> None:
        import torch

        for key, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            best, rates = matmul_peak(dtype, self.sizes, self.repeats)
            self.rates[key].append(best)
            self.by_size[key].append({str(n): r / 1e9 for n, r in rates.items()})

    def best(self, key: str) -> float:
        return max(self.rates[key])

    def summary(self) -> dict:
        return {"bf16": self.best("bf16") / 1e9, "fp32": self.best("fp32") / 1e9,
                "bf16_all": [p / 1e9 for p in self.rates["bf16"]],
                "fp32_all": [p / 1e9 for p in self.rates["fp32"]],
                "by_size_gflops": self.by_size, "sizes": list(self.sizes)}


def _time_variants(names: list[str], per_stage: int,
                   repeats: int) -> tuple[dict, dict[str, list[float]], float | None]:
    """The teacher's FLOPs per iteration (bf16, fp32), every variant's seconds per recover
    iteration over the repeats, and the one-off compile time (None when not compiled)."""
    import torch

    from fadrm.config import RecoverConfig
    from fadrm.models import create_model
    from fadrm.synthesis import recover

    torch.manual_seed(0)
    teacher = create_model("resnet18", CLASSES, 3, SIZE).eval()
    flops = {"bf16": teacher_flops(teacher, BATCH, SIZE, True),
             "fp32": teacher_flops(teacher, BATCH, SIZE, False)}
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen).clamp(-2, 2)
    labels = torch.arange(BATCH) % CLASSES
    cpu = torch.device("cpu")

    def config(name: str, iters: int) -> RecoverConfig:
        method, nhwc, bn, _, comp = VARIANTS[name]
        cfg = RecoverConfig(method=method, resolutions=[SIZE] * 4, stage_iterations=[iters] * 4,
                            lr=0.05, r_bn=0.0 if bn == "none" else 0.01, channels_last=nhwc,
                            compile=comp)
        cfg.validate("recover")
        return cfg

    def run(name: str, iters: int) -> float:
        _, _, bn, aug, _ = VARIANTS[name]
        with _patched(bn, aug):
            start = time.perf_counter()
            recover(init, labels, [teacher], config(name, iters), MEAN, STD, SIZE, seed=0,
                    device=cpu)
            return time.perf_counter() - start

    compile_seconds = None
    for name in names:  # warm-up (and the one-off compilation)
        secs = run(name, 1)
        if VARIANTS[name][4]:
            compile_seconds = secs
        print(f"[{NAME}] warm-up {name}: {secs:.1f} s", flush=True)
    per_iter: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):  # round-robin, so drifting machine load hits all variants
        for name in names:
            per_iter[name].append(run(name, per_stage) / (4 * per_stage))
        print(f"[{NAME}] repeat {r + 1}/{repeats} done", flush=True)
    return flops, per_iter, compile_seconds


def _rows(per_iter: dict[str, list[float]], flops: dict, peaks: _Peaks) -> dict:
    """One row per variant: the median time per iteration and the fractions of the peaks."""
    rows = {}
    for name, times in per_iter.items():
        method = VARIANTS[name][0]
        f = flops["bf16" if method == "fadrm" else "fp32"]
        secs = common.median(times)
        rate = f / secs
        rows[name] = {
            "method": method, "channels_last": VARIANTS[name][1], "bn_stats": VARIANTS[name][2],
            "augmentation": VARIANTS[name][3], "compile": VARIANTS[name][4],
            "seconds_per_iteration": secs, "seconds_all": times,
            "teacher_gflop_per_iteration": f / 1e9, "achieved_gflops": rate / 1e9,
            "fraction_of_bf16_peak": rate / peaks.best("bf16"),
            "fraction_of_fp32_peak": rate / peaks.best("fp32"),
        }
    return rows


def _write(out: dict, peaks: _Peaks, results) -> None:
    """``hardware_limit.{json,md}`` in ``results``, and the headline on stdout."""
    written = common.write_json(NAME, out, results)
    rows, best = out["variants"], out["best_setting"]
    table = common.markdown_table(
        ["variant", "s / iteration", "GFLOP/s", "of bf16 peak", "of fp32 peak"],
        [[n, r["seconds_per_iteration"], r["achieved_gflops"], r["fraction_of_bf16_peak"],
          r["fraction_of_fp32_peak"]] for n, r in rows.items()], digits=3)
    compile_seconds = out["compile_seconds"]
    head = (f"Machine: {common.machine_line(out['machine'])}. "
            f"{'QUICK smoke size. ' if out['quick'] else ''}"
            f"Matmul peak (best torch.mm over n = {', '.join(map(str, peaks.sizes))}, "
            f"{out['threads']} threads): bf16 "
            f"{peaks.best('bf16') / 1e9:.1f} GFLOP/s, fp32 {peaks.best('fp32') / 1e9:.1f} "
            f"GFLOP/s. Teacher forward+backward "
            f"{out['teacher_gflop_per_iteration']['bf16']:.1f} GFLOP per iteration. Best "
            f"complete setting: **{best}** at {out['fraction_of_bf16_peak']:.0%} of the bf16 "
            f"peak ({out['fraction_of_fp32_peak']:.0%} of fp32)."
            + (f" torch.compile took {compile_seconds:.0f} s to compile."
               if compile_seconds else " torch.compile not measured in this run."))
    common.write_markdown(NAME, "Distance to the hardware limit", [head, table], results)
    print(f"[{NAME}] results: {written} (and .md)", flush=True)
    print(json.dumps({k: out[k] for k in ("best_setting", "fraction_of_bf16_peak",
                                          "fraction_of_fp32_peak")}, indent=1))


if __name__ == "__main__":
    main()
