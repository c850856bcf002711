"""224-px preprocessing, old vs new: select's crops of the stored image and the validation
transform, on non-square images whose content reaches past the centre square.

    python -m benchmarks.preprocessing            # 18 min on 2 busy cores (+<11 the 1st time)
    python -m benchmarks.preprocessing --quick    # ~1 min smoke size

Writes a CIFAR-10 ImageFolder of 72 x 96 px JPEGs under benchmarks/work/preprocessing/
(not tracked; written once): each 32 px image is upscaled to 72 x 72 and placed at a random
horizontal offset on a 72 x 96 canvas (the edge columns replicated outwards), so the 72 x 72
centre square that decoding at ``data.resolution`` keeps cuts off up to 12 px of the object.
Training images are the first ``train_per_class`` of each class of
/work/shared/datasets/cifar10-train, validation the next ``val_per_class``.

At resolution 64, with one ConvNet teacher trained here (squeeze, centre squares) and given
to every run as weights:

* **validation**: teacher and student top-1 with ``data.val_crop_ratio`` None (the centre
  square, the old behaviour) and 0.875 (torchvision's Resize + CenterCrop);
* **select**: RDED (select -> relabel -> student, no pixel optimisation) with
  ``select.full_resolution`` false (old: crops of the 64 px centre square) and true (crops of
  the stored 72 x 96 image), plus true with torchvision's aspect-ratio range
  ``select.crop_ratio`` [3/4, 4/3]; reported: the teacher's mean realism (-CE) of the selected
  images, and the student's top-1 (both validation transforms), per seed and averaged.

Writes benchmarks/results/preprocessing.json and preprocessing.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import common

NAME = "preprocessing"
CANVAS = (72, 96)  # H x W of the stored images
OBJECT = 72  # side of the upscaled CIFAR-10 image on the canvas
RESOLUTION = 64
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
VARIANTS = {  # name -> select settings (the old behaviour first)
    "centre-square (old)": {"full_resolution": False},
    "full-resolution": {"full_resolution": True},
    "full-resolution, ratio 3/4-4/3": {"full_resolution": True, "crop_ratio": [0.75, 4 / 3]},
}
RATIOS = {"centre square (old)": None, "resize + centre crop 0.875": 0.875}
SIZES = {
    "default": {"train_per_class": 500, "val_per_class": 200, "teacher_epochs": 15,
                "ipc": 10, "candidates": 100, "crops": 5, "epochs": 40, "seeds": [0, 1]},
    "quick": {"train_per_class": 60, "val_per_class": 20, "teacher_epochs": 1,
              "ipc": 2, "candidates": 20, "crops": 2, "epochs": 4, "seeds": [0]},
}


def write_tree(work: Path, size: dict) -> Path:
    """The 72 x 96 ImageFolder (train/ and val/), written once per size."""
    import numpy as np
    from PIL import Image

    root = work / f"tree-{size['train_per_class']}-{size['val_per_class']}"
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    pad = CANVAS[1] - OBJECT
    for cls in sorted(p.name for p in common.CIFAR10.iterdir() if p.is_dir()):
        files = sorted((common.CIFAR10 / cls).glob("*.jpg"))
        split = {"train": files[:size["train_per_class"]],
                 "val": files[size["train_per_class"]:][:size["val_per_class"]]}
        for name, chosen in split.items():
            (root / name / cls).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                obj = Image.open(f).convert("RGB").resize((OBJECT, OBJECT),
                                                          Image.Resampling.BICUBIC)
                left = int(rng.integers(0, pad + 1))
                canvas = np.pad(np.asarray(obj), ((0, 0), (left, pad - left), (0, 0)),
                                mode="edge")
                Image.fromarray(canvas).save(root / name / cls / f.name, quality=95)
    (root / "done").write_text("")
    return root


def data_section(root: Path, ratio: float | None = None) -> dict:
    return {"kind": "imagefolder", "root": str(root / "train"), "val_root": str(root / "val"),
            "resolution": RESOLUTION, "channels": 3, "mean": MEAN, "std": STD,
            "val_crop_ratio": ratio}


def run_config(root: Path, output: Path, weights: str, select: dict, seed: int,
               size: dict) -> dict:
    """One RDED run: select -> relabel -> student (no recover), the teacher given."""
    ipc = size["ipc"]
    return {
        "name": f"preprocessing-s{seed}", "output": str(output), "seed": seed, "ipc": ipc,
        "data": data_section(root), "teachers": [{"model": "convnet", "weights": weights}],
        "select": {"num_candidates": size["candidates"], "num_crops": size["crops"],
                   "factor": 1, **select},
        "recover": {"method": "rded", "resolutions": [RESOLUTION], "stage_iterations": [1]},
        "relabel": {"epochs": size["epochs"], "batch_size": min(20, 10 * ipc),
                    "epochs_per_shard": min(50, size["epochs"]), "teacher_bn_mode": "train"},
        "student": {"model": "convnet", "lr": 1e-3, "eta": 2.0, "accumulation_steps": 1,
                    "eval_every": 0},
        "execution": {"device": "cpu"},
    }


def run_stages(cfg_dict: dict):
    """Run (or find done) every stage of a config in this process; returns its plan."""
    from fadrm.config import load_config
    from fadrm.executors import LocalExecutor
    from fadrm.plan import RunPlan
    from fadrm.progress import StageProgress

    plan = RunPlan(load_config(cfg_dict))
    plan.source.write_index(plan.cfg.output)
    exe = LocalExecutor("cpu")
    for stage in plan.stages:
        pending = stage.pending()
        if pending:
            exe.run_stage(stage, pending, StageProgress(stage.label, len(pending),
                                                        enabled=False))
    return plan


def val_sets(root: Path) -> dict:
    """The validation set decoded with each transform of :data:`RATIOS`."""
    from fadrm.config import DataConfig
    from fadrm.datasource import DataSource

    return {name: DataSource(DataConfig(**data_section(root, ratio))).split("val")
            for name, ratio in RATIOS.items()}


def load_model(path: str):
    import torch

    from fadrm.models import create_model

    model = create_model("convnet", 10, in_chans=3, image_size=RESOLUTION)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def top1(model, vals: dict) -> dict:
    import torch

    from fadrm.metrics import evaluate

    return {name: round(evaluate(model, val, MEAN, STD, torch.device("cpu"))[0], 2)
            for name, val in vals.items()}


def mean_realism(plan, teacher) -> float:
    """The teacher's mean -CE of the selected images (at the resolution, as scored)."""
    import torch

    from fadrm.data import normalize
    from fadrm.datasource import load_distilled
    from fadrm.patches import score_realism

    images, labels = load_distilled(plan)
    scores = score_realism(teacher, normalize(images, MEAN, STD), labels, RESOLUTION, 256,
                           torch.device("cpu"))
    return round(float(scores.mean()), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preprocessing")
    parser.add_argument("--quick", action="store_true", help="smoke size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results; --quick: "
                             "benchmarks/work/results-quick)")
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "default"]
    threads = common.set_threads(args.threads)
    machine = common.machine_info()
    work = common.WORK / NAME
    start = time.perf_counter()
    root = write_tree(work, size)
    wrote = time.perf_counter() - start
    tag = f"{size['train_per_class']}-{size['val_per_class']}-e{size['teacher_epochs']}"
    squeeze = {"epochs": size["teacher_epochs"], "batch_size": 128, "lr": 0.05,
               "weight_decay": 5e-4}
    (weights,) = common.train_teachers(data_section(root), [{"model": "convnet"}], squeeze,
                                       work / f"teachers-{tag}", device="cpu")
    teacher = load_model(weights)
    vals = val_sets(root)
    teacher_top1 = top1(teacher, vals)
    print("teacher top-1", json.dumps(teacher_top1), flush=True)

    runs = [_run_variant(variant, select, seed, root, work / f"runs-{tag}", weights, teacher,
                         vals, size)
            for variant, select in VARIANTS.items() for seed in size["seeds"]]
    rows = _rows(runs)
    out = {"quick": args.quick, "size": size, "threads": threads, "machine": machine,
           "canvas_hw": list(CANVAS), "object_side": OBJECT, "resolution": RESOLUTION,
           "teacher": {"model": "convnet", "squeeze": squeeze, "top1": teacher_top1},
           "runs": runs, "rows": rows,
           "seconds": {"write_tree": round(wrote, 1),
                       "total": round(time.perf_counter() - start, 1)}}
    _write(out, common.results_dir(args.quick, args.out))
    return 0


def _run_variant(variant: str, select: dict, seed: int, root: Path, runs_dir: Path, weights,
                 teacher, vals, size: dict) -> dict:
    """One RDED run with ``select``: the realism of what it selected, the student's top-1."""
    t = time.perf_counter()
    cfg = run_config(root, runs_dir, weights, select, seed, size)
    plan = run_stages(cfg)
    student = load_model(str(Path(plan.evaluate.dir) / "student.pt"))
    run = {"variant": variant, "seed": seed, "select": select,
           "realism": mean_realism(plan, teacher), "student_top1": top1(student, vals),
           "seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps(run), flush=True)
    return run


def _rows(runs: list[dict]) -> list[dict]:
    """Per variant: mean +- std of the realism and of top-1 on each validation crop."""
    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        row = {"variant": variant, "realism": common.mean_std([r["realism"] for r in mine])}
        for ratio in RATIOS:
            row[ratio] = common.mean_std([r["student_top1"][ratio] for r in mine])
        rows.append(row)
    return rows


def _write(out: dict, results: Path) -> None:
    """``preprocessing.{json,md}`` in ``results``."""
    path = common.write_json(NAME, out, results)
    size, rows, teacher_top1 = out["size"], out["rows"], out["teacher"]["top1"]
    seeds = len(size["seeds"])
    table = common.markdown_table(
        ["select", "mean realism (-CE)", *[f"student top-1, val {r}" for r in RATIOS]],
        [[r["variant"], f"{r['realism'][0]:.3f} +- {r['realism'][1]:.3f}",
          *[f"{r[k][0]:.2f} +- {r[k][1]:.2f}" for k in RATIOS]] for r in rows])
    teacher_line = ", ".join(f"val {k}: {v:.2f} %" for k, v in teacher_top1.items())
    common.write_markdown(NAME, "224-px preprocessing, old vs new (72 x 96 CIFAR-10 canvases, "
                          "64 px)", [f"Teacher (ConvNet) top-1: {teacher_line}.",
                                     f"RDED, IPC {size['ipc']}, mean +- std over {seeds} "
                                     f"seed(s):\n\n{table}",
                                     f"Machine: {common.machine_line(out['machine'])}."],
                          results)
    print(f"wrote {path} in {out['seconds']['total']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
