"""Data scale: peak memory and seconds of select and evaluate at N and 10 x N real images.

    python -m benchmarks.data_scale            # N = 5,000 (and 50,000): ~20 min, ~1.5 GB disk
    python -m benchmarks.data_scale --quick    # N = 500 (and 5,000): ~4 min

Writes synthetic ImageFolder trees of JPEGs with ImageNet-like sizes (about 400 x 350 px,
smooth random colour fields, ~25 KB each) for 100 classes: a training tree of N or 10 x N
images and one validation tree of 20 images per class shared by both. Then, for each tree,
runs the real pipeline (ResNet-18-sized work is not the point here: a ConvNet teacher with
given weights, 64 px, 1 recover iteration, 1 relabel epoch) through the in-process executor,
one stage per child process, and records each stage's peak RSS (the child's ru_maxrss) and
seconds. Select decodes only its candidates (the same m per class at both sizes: 40, or all of a
class at N when it has fewer) and evaluate only
the validation tree, so neither should grow with N: ``rss_ratio_10x`` (largest peak at 10 N /
at N, target <= 1.2) and ``select_seconds_ratio_10x`` (target <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

NAME = "data_scale"
CLASSES = 100
VAL_PER_CLASS = 20
TARGETS = {"rss_ratio_10x": 1.2, "select_seconds_ratio_10x": 1.5}


def _write_tree(root: Path, per_class: int, seed: int) -> int:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = 0
    for c in range(CLASSES):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = int(rng.integers(360, 440)), int(rng.integers(320, 380))
            small = rng.integers(0, 255, (h // 40 + 1, w // 40 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
            img.save(folder / f"{i:06d}.jpg", quality=85)
            written += 1
    return written


def _config(train: Path, val: Path, output: Path, weights: str, candidates: int) -> dict:
    return {
        "name": "data-scale", "output": str(output), "seed": 0, "ipc": 2,
        "data": {"kind": "imagefolder", "root": str(train), "val_root": str(val),
                 "resolution": 64},
        "teachers": [{"model": "convnet", "weights": weights}],
        "select": {"num_candidates": candidates, "num_crops": 2},
        "recover": {"method": "fadrm", "resolutions": [64], "stage_iterations": [1],
                    "class_block_size": 25},
        "relabel": {"epochs": 1, "batch_size": 50, "epochs_per_shard": 1},
        "student": {"model": "convnet", "accumulation_steps": 1},
        "execution": {"device": "cpu"},
    }


CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from fadrm.config import load_config
from fadrm.executors import LocalExecutor
from fadrm.plan import RunPlan
from fadrm.progress import StageProgress
cfg = load_config(json.loads(sys.argv[1]))
plan = RunPlan(cfg)
stage = next(s for s in plan.stages if s.name == sys.argv[2])
if sys.argv[2] == "select":
    plan.source.write_index(cfg.output)
start = time.perf_counter()
LocalExecutor("cpu").run_stage(stage, stage.pending(), StageProgress(stage.name, 1, False))
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"seconds": seconds,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _stage(cfg: dict, name: str) -> dict:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), name], env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_scale")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results; --quick: "
                             "benchmarks/work/results-quick)")
    parser.add_argument("--work", type=Path, default=None, help="where the trees go")
    args = parser.parse_args(argv)
    n = 500 if args.quick else 5000
    work = args.work or Path(tempfile.mkdtemp(prefix="fadrm-data-scale-"))
    import torch

    from fadrm.models import create_model

    weights = work / "teacher.pt"
    torch.manual_seed(0)
    torch.save(create_model("convnet", CLASSES, image_size=64).state_dict(), weights)
    val = work / "val"
    if not val.exists():
        _write_tree(val, VAL_PER_CLASS, seed=1)
    sizes = {}
    try:
        for label, total in (("N", n), ("10N", 10 * n)):
            train = work / f"train-{total}"
            if not train.exists():
                t = time.perf_counter()
                _write_tree(train, total // CLASSES, seed=2)
                print(f"wrote {total} JPEGs in {time.perf_counter() - t:.0f} s", flush=True)
            # The same m at both sizes (all of a class at N when it has fewer than 40).
            cfg = _config(train, val, work / f"out-{total}", str(weights), min(40, n // CLASSES))
            result = {"train_images": total, "disk_mib": round(sum(
                f.stat().st_size for f in train.rglob("*.jpg")) / 2**20, 1)}
            for stage in ("select", "recover", "relabel", "evaluate"):
                result[stage] = _stage(cfg, stage)
                print(label, stage, json.dumps(result[stage]), flush=True)
            sizes[label] = result
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    peak = {k: max(v[s]["peak_rss_mib"] for s in ("select", "evaluate")) for k, v in sizes.items()}
    rss_ratio = peak["10N"] / peak["N"]
    select_ratio = sizes["10N"]["select"]["seconds"] / sizes["N"]["select"]["seconds"]
    out = {
        "quick": args.quick, "machine": common.machine_info(), "classes": CLASSES,
        "val_images": CLASSES * VAL_PER_CLASS, "sizes": sizes,
        "largest_peak_rss_mib": peak, "rss_ratio_10x": round(rss_ratio, 3),
        "select_seconds_ratio_10x": round(select_ratio, 3), "targets": TARGETS,
        "met": {"rss_ratio_10x": rss_ratio <= TARGETS["rss_ratio_10x"],
                "select_seconds_ratio_10x": select_ratio <= TARGETS["select_seconds_ratio_10x"]},
    }
    path = common.write_json(NAME, out, common.results_dir(args.quick, args.out))
    print(f"rss ratio {rss_ratio:.2f} (target <= 1.2), select seconds ratio "
          f"{select_ratio:.2f} (target <= 1.5); wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
