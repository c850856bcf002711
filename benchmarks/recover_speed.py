"""Recover speed and peak memory: FADRM's recover against a naive SRe2L-style loop.

    python -m benchmarks.recover_speed            # default size (~15 min on 2 CPU cores)
    python -m benchmarks.recover_speed --quick    # smoke size (~2 min)

Same teacher (seeded random init: speed does not depend on what it learnt), same initial
images, same iteration count; image-iterations per second (median over repeats) and peak
memory, each variant in a fresh subprocess:

* ``naive``: an SRe2L-style loop written here: fp32, full resolution throughout, no
  residual, the plain NCHW layout, one random-resized crop / flip / roll per batch, and the
  usual BN-statistics hooks (``mean`` and ``var`` of each BN input by separate reductions).
* ``fadrm``: ``fadrm.synthesis.recover`` with method fadrm: MRO + ARC + mixed precision (bf16
  on CPU, fp16 on CUDA), channels_last, the fused BN-statistics path (the shipped default).
* ablations (default size only): ``sre2l`` = our recover as SRe2L (fp32, one resolution,
  channels_last), ``fadrm-nchw`` = fadrm with ``recover.channels_last: false``.

Two settings, both reported: ``imagenet224`` (the paper's setting: ResNet-18 with the
ImageNet stem, MRO 200 -> 224 -> 200 -> 224, a small batch) is the headline, and ``cifar32``
(ResNet-18 small-image teacher, 32 px, batch 100 = one image per class), where MRO has no
lower resolution and only mixed precision and the kernels can help.

Peak memory on CPU is the process's resident-set high-water mark (VmHWM). The headline
``peak_memory_ratio`` is the ratio of *working* memory: peak minus the resident set right
before the first iteration (teacher, images and the ~0.4 GB of loaded libraries are the
same for both and are excluded); ``peak_rss_ratio_total`` is the ratio of the whole peaks.
On CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the loop.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from benchmarks import common

NAME = "recover_speed"

SETTINGS = {
    # name: model, classes, small stem, data resolution, MRO resolutions, jitter
    "imagenet224": {"model": "resnet18", "classes": 1000, "small_stem": False, "size": 224,
                    "resolutions": [200, 224, 200, 224], "jitter": 32},
    "cifar32": {"model": "resnet18", "classes": 100, "small_stem": True, "size": 32,
                "resolutions": [32, 32, 32, 32], "jitter": 4},
}
SIZES = {
    # setting: (batch, iterations per stage, repeats)
    "default": {"imagenet224": (16, 10, 3), "cifar32": (100, 5, 3)},
    "quick": {"imagenet224": (4, 2, 2), "cifar32": (100, 1, 2)},
}
VARIANTS = ["naive", "sre2l", "fadrm-nchw", "fadrm"]
QUICK_VARIANTS = ["naive", "fadrm"]
TARGETS = {"speedup": 3.0, "peak_memory_ratio": 0.5}


# --------------------------------------------------------------------------- child side


def _teacher(setting: dict, device):
    import torch

    from fadrm.models import create_model

    torch.manual_seed(0)
    model = create_model(setting["model"], setting["classes"], 3, setting["size"],
                         small_stem=setting["small_stem"])
    return model.to(device).eval()


def _init_images(batch: int, size: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=gen).clamp(-2, 2)


def naive_recover(init, labels, teacher, iterations: int, lr: float, r_bn: float,
                  first_multiplier: float, jitter: int, seed: int, device):
    """SRe2L-style pixel optimisation: fp32, one resolution, no residual, NCHW."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    teacher.eval()
    teacher.requires_grad_(False)
    terms: list = []

    def hook(module, inputs, _output):
        a = inputs[0]
        nch = a.shape[1]
        mean = a.mean([0, 2, 3])
        var = a.permute(1, 0, 2, 3).contiguous().view(nch, -1).var(1, unbiased=False)
        terms.append(torch.norm(module.running_mean - mean, 2)
                     + torch.norm(module.running_var - var, 2))

    handles = [m.register_forward_hook(hook) for m in teacher.modules()
               if isinstance(m, nn.BatchNorm2d)]
    gen = torch.Generator().manual_seed(seed)
    x = init.detach().clone().to(device).requires_grad_(True)
    labels = labels.to(device)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9))
    size = x.shape[-1]
    try:
        for it in range(iterations):
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * it / iterations))
            # One RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) for the whole batch.
            area = size * size * float(torch.empty(1).uniform_(0.08, 1.0, generator=gen))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3),
                                                             generator=gen)))
            w = min(size, max(1, round(math.sqrt(area * ratio))))
            h = min(size, max(1, round(math.sqrt(area / ratio))))
            top = int(torch.randint(0, size - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, size - w + 1, (1,), generator=gen))
            view = F.interpolate(x[:, :, top:top + h, left:left + w], size=(size, size),
                                 mode="bilinear", align_corners=False)
            if float(torch.rand(1, generator=gen)) < 0.5:
                view = view.flip(-1)
            dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
            view = torch.roll(view, shifts=(dx, dy), dims=(2, 3))
            terms.clear()
            out = teacher(view)
            bn = sum(t * (first_multiplier if i == 0 else 1.0) for i, t in enumerate(terms))
            loss = F.cross_entropy(out, labels) + r_bn * bn
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(-2.5, 2.5)
    finally:
        for h_ in handles:
            h_.remove()
    return x.detach()


def _ours(init, labels, teacher, setting: dict, variant: str, per_stage: int, device):
    from fadrm.config import RecoverConfig
    from fadrm.synthesis import recover

    method = "sre2l" if variant == "sre2l" else "fadrm"
    cfg = RecoverConfig(method=method, resolutions=list(setting["resolutions"]),
                        stage_iterations=[per_stage] * len(setting["resolutions"]),
                        lr=0.25, jitter=setting["jitter"],
                        channels_last=variant != "fadrm-nchw")
    cfg.validate("recover")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return recover(init, labels, [teacher], cfg, mean, std, setting["size"], seed=0,
                   device=device).images


def child(spec: dict) -> dict:
    """One variant in this (fresh) process: warm-up, timed repeats, peak memory."""
    import torch

    from fadrm.amp import resolve_device

    common.set_threads(spec["threads"])
    device = resolve_device(spec.get("device", "auto"))
    setting = SETTINGS[spec["setting"]]
    batch, per_stage, repeats = spec["batch"], spec["per_stage"], spec["repeats"]
    iterations = per_stage * len(setting["resolutions"])
    teacher = _teacher(setting, device)
    init = _init_images(batch, setting["size"])
    labels = torch.arange(batch) % setting["classes"]

    def run(n_per_stage: int):
        if spec["variant"] == "naive":
            naive_recover(init, labels, teacher, n_per_stage * len(setting["resolutions"]),
                          0.25, 0.01, 10.0, setting["jitter"], 0, device)
        else:
            _ours(init, labels, teacher, setting, spec["variant"], n_per_stage, device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = common.rss_mib()
    common.reset_peak_rss()
    run(1)  # warm-up: every resolution once (kernel selection, allocator)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(per_stage)
        seconds.append(time.perf_counter() - start)
    out = {
        "variant": spec["variant"], "setting": spec["setting"], "batch": batch,
        "iterations": iterations, "seconds": seconds,
        "img_iter_per_s": batch * iterations / common.median(seconds),
        "baseline_rss_mib": base_rss, "peak_rss_mib": common.peak_rss_mib(),
    }
    out["working_mib"] = out["peak_rss_mib"] - base_rss
    if device.type == "cuda":
        out["gpu_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out["working_mib"] = out["gpu_peak_mib"]
    out["device"] = device.type
    return out


# --------------------------------------------------------------------------- driver


def _table(name: str, res: dict) -> str:
    rows = []
    naive = res["variants"].get("naive")
    for variant, r in res["variants"].items():
        rows.append([
            variant, r["batch"], r["iterations"], r["img_iter_per_s"],
            r["img_iter_per_s"] / naive["img_iter_per_s"] if naive else None,
            r["working_mib"], r["working_mib"] / naive["working_mib"] if naive else None,
            r["peak_rss_mib"],
        ])
    headers = ["variant", "batch", "iterations", "img-iter/s (median)", "speed vs naive",
               "working MiB", "working vs naive", "peak RSS MiB"]
    return f"**{name}**\n\n" + common.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    if args.child:
        common.emit(child(json.loads(args.child)))
        return {}

    size = "quick" if args.quick else "default"
    variants = args.variants or (QUICK_VARIANTS if args.quick else VARIANTS)
    threads = common.set_threads(args.threads)
    info = common.machine_info()
    started = time.perf_counter()
    results = {name: _measure_setting(name, SIZES[size][name], variants, threads, args)
               for name in args.settings}

    headline = "imagenet224" if "imagenet224" in results else args.settings[0]
    head = results[headline]
    out = {
        "quick": args.quick, "machine": info, "threads": threads,
        "headline_setting": headline,
        "speedup": head.get("speedup"),
        "peak_memory_ratio": head.get("peak_memory_ratio"),
        "peak_rss_ratio_total": head.get("peak_rss_ratio_total"),
        "targets": TARGETS,
        "met": {"speedup": (head.get("speedup") or 0) >= TARGETS["speedup"],
                "peak_memory_ratio": (head.get("peak_memory_ratio") or math.inf)
                <= TARGETS["peak_memory_ratio"]},
        "memory_note": "working = peak RSS (VmHWM) minus the RSS right before the first "
                       "iteration, each variant in a fresh process; on CUDA "
                       "max_memory_allocated above the allocation before the loop",
        "settings": results,
        "wall_seconds": time.perf_counter() - started,
    }
    _write(out)
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size (~2 min)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (all cores)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _measure_setting(name: str, sizes: tuple, variants: list[str], threads: int, args) -> dict:
    """Every variant of one setting, each in a fresh process; fadrm against naive."""
    batch, per_stage, repeats = sizes
    repeats = args.repeats or repeats
    res = {"batch": batch, "iterations": per_stage * 4, "repeats": repeats,
           **SETTINGS[name], "variants": {}}
    for variant in variants:
        spec = {"setting": name, "variant": variant, "batch": batch,
                "per_stage": per_stage, "repeats": repeats, "threads": threads,
                "device": args.device}
        print(f"[{NAME}] {name} / {variant} ...", flush=True)
        res["variants"][variant] = common.run_child(
            "benchmarks.recover_speed", ["--child", json.dumps(spec)])
        r = res["variants"][variant]
        print(f"    {r['img_iter_per_s']:.2f} img-iter/s, working {r['working_mib']:.0f} "
              f"MiB, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    v = res["variants"]
    if "naive" in v and "fadrm" in v:
        res["speedup"] = v["fadrm"]["img_iter_per_s"] / v["naive"]["img_iter_per_s"]
        res["peak_memory_ratio"] = v["fadrm"]["working_mib"] / v["naive"]["working_mib"]
        res["peak_rss_ratio_total"] = v["fadrm"]["peak_rss_mib"] / v["naive"]["peak_rss_mib"]
    return res


def _write(out: dict) -> None:
    """``recover_speed.{json,md}`` and the headline on stdout."""
    results = common.results_dir(bool(out.get("quick")))
    common.write_json(NAME, out, results)
    quick = "QUICK smoke size. " if out["quick"] else ""
    sections = [f"Machine: {common.machine_line(out['machine'])}. {quick}"
                f"Headline ({out['headline_setting']}): speedup {common.fmt(out['speedup'])}x, "
                f"working-memory ratio {common.fmt(out['peak_memory_ratio'])}, whole-peak ratio "
                f"{common.fmt(out['peak_rss_ratio_total'])}."]
    sections += [_table(name, res) for name, res in out["settings"].items()]
    common.write_markdown(NAME, "Recover speed and memory", sections, results)
    print(json.dumps({k: out[k] for k in ("speedup", "peak_memory_ratio",
                                          "peak_rss_ratio_total")}, indent=1))


if __name__ == "__main__":
    main()
