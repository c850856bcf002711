"""Student scaling: optimiser steps per second with 1 and 2 Ray Train workers.

    python -m benchmarks.student_scaling            # default size (~10 min on 2 CPU cores)
    python -m benchmarks.student_scaling --quick    # smoke size (~3 min)

Fashion-MNIST, a ConvNet teacher (squeeze), random-real images, soft labels: everything up
to relabel runs before the timing (in this process for 1 worker; for 2 through Ray, since
``execution.train_workers: 2`` trains the teacher on 2 ranks too and is in its key). Then the evaluate stage (the student) runs through
``ray_jobs.executor.RayTrainExecutor`` on an embedded ``ray.init()`` with exactly 1, then
exactly 2 workers (``threads_per_worker: 1``), same seed, same global batch (the stored
relabel batch, split into ``accumulation_steps`` micro-batches that the ranks share out).

Each run records the student's optimiser steps and its training seconds (evaluation
excluded), as the evaluate stage writes them into its metrics.json. ``speedup_2_workers`` is
(steps/s with 2) / (steps/s with 1); ``top1_delta_2_vs_1_workers`` the final top-1
difference in points (the teachers differ: each trained on its own rank count; the
student's gradients are the same, BatchNorm's running statistics follow rank 0's
micro-batches). Targets: speedup >= 1.6, |delta| <= 1.0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.accuracy import BUDGETS, data_section

NAME = "student_scaling"
TARGETS = {"speedup_2_workers": 1.6, "abs_top1_delta": 1.0}
SIZES = {
    # ipc x 10 classes distilled images; the stored batch is split into 4 micro-batches.
    "default": {"ipc": 50, "epochs": 60, "relabel_batch": 100, "accumulation": 4,
                "teacher_epochs": 2, "max_train_per_class": 1000, "max_val": 2000},
    "quick": {"ipc": 10, "epochs": 8, "relabel_batch": 40, "accumulation": 4,
              "teacher_epochs": 1, "max_train_per_class": 300, "max_val": 500},
}


def config(output: Path, size: dict, workers: int) -> dict:
    data = data_section("fmnist", BUDGETS["cpu"])
    data.update(max_train_per_class=size["max_train_per_class"], max_val=size["max_val"])
    return {
        "name": f"student-{workers}", "output": str(output), "seed": 0, "ipc": size["ipc"],
        "data": data, "teachers": [{"model": "convnet"}],
        "squeeze": {"epochs": size["teacher_epochs"], "batch_size": 128, "lr": 0.05},
        "recover": {"method": "random-real"},
        "relabel": {"epochs": size["epochs"], "batch_size": size["relabel_batch"],
                    "epochs_per_shard": size["epochs"], "crop_scale": [0.5, 1.0]},
        "student": {"model": "convnet", "accumulation_steps": size["accumulation"],
                    "eval_every": 0, "mixed_precision": True},
        # train_workers: the student trains on all of them (DDP); it is in the keys of
        # squeeze and evaluate, so each worker count has its own teacher and student.
        "execution": {"min_workers": workers, "max_workers": workers, "train_workers": workers,
                      "threads_per_worker": 1, "max_failures": 0, "device": "cpu"},
    }


def run_student(cfg_dict: dict) -> dict:
    """Everything before the student locally (cached), then the student through Ray."""
    import ray

    from fadrm.config import load_config
    from fadrm.executors import LocalExecutor
    from fadrm.plan import RunPlan
    from fadrm.progress import StageProgress
    from ray_jobs.executor import RayTrainExecutor

    cfg = load_config(cfg_dict)
    plan = RunPlan(cfg)
    # The stages before the student: locally for one rank; on Ray for several (the local
    # executor trains on one rank only, and the teacher's key says how many).
    before = LocalExecutor("cpu") if cfg.execution.train_workers == 1 else RayTrainExecutor(cfg)
    try:
        for stage in plan.stages[:-1]:
            pending = stage.pending()
            if pending:
                before.run_stage(stage, pending, StageProgress(stage.label, len(pending), False))
    finally:
        ray.shutdown()
    evaluate = plan.evaluate
    shutil.rmtree(evaluate.dir, ignore_errors=True)  # measured afresh each time
    start = time.perf_counter()
    try:
        RayTrainExecutor(cfg).run_stage(evaluate, evaluate.pending(),
                                        StageProgress("evaluate", 1, False))
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    metrics = json.loads(Path(evaluate.unit_uri("student")).read_text())
    return {
        "workers": metrics["student_workers"], "steps": metrics["student_steps"],
        "train_seconds": metrics["student_train_seconds"],
        "steps_per_second": metrics["student_steps"] / metrics["student_train_seconds"],
        "stage_wall_seconds": round(wall, 2), "top1": metrics["student_top1"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.student_scaling")
    parser.add_argument("--quick", action="store_true", help="smoke size")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results; --quick: "
                             "benchmarks/work/results-quick)")
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "default"]
    root = Path(tempfile.mkdtemp(prefix="fadrm-student-scaling-"))
    runs = []
    try:
        for workers in (1, 2):
            runs.append(run_student(config(root / "out", size, workers)))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    one, two = runs
    speedup = two["steps_per_second"] / one["steps_per_second"]
    delta = two["top1"] - one["top1"]
    result = {
        "quick": args.quick, "size": size, "machine": common.machine_info(), "runs": runs,
        "same_steps": one["steps"] == two["steps"],
        "speedup_2_workers": round(speedup, 3),
        "top1_delta_2_vs_1_workers": round(delta, 2),
        "targets": TARGETS,
        "met": {"speedup_2_workers": speedup >= TARGETS["speedup_2_workers"],
                "top1_delta": abs(delta) <= TARGETS["abs_top1_delta"]},
    }
    path = common.write_json(NAME, result, common.results_dir(args.quick, args.out))
    print(f"speedup {speedup:.2f}x (target >= 1.6), top-1 delta {delta:+.2f} points "
          f"(target |d| <= 1.0), steps {one['steps']} / {two['steps']}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
