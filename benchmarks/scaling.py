"""Scaling: recover units per second with 1 and 2 Ray Train workers (one thread each).

    python -m benchmarks.scaling            # default size (~10 min on 2 CPU cores)
    python -m benchmarks.scaling --quick    # smoke size (~2 min)

Fashion-MNIST, a ConvNet teacher (squeeze, shared with the other benchmarks' work root),
the recover stage run through ``ray_jobs.executor.RayTrainExecutor`` on an embedded
``ray.init()``: ``execution.max_workers`` 1, then 2, ``threads_per_worker: 1``. Every run
writes into a fresh output root (select is redone there, cheaply), so all units are pending.

Two rates per run: *steady* = units finished after the first round divided by the time
from the end of the first round (one unit per worker) to the last unit, which excludes Ray
Train's start-up (worker processes, process group, setup); and *wall* = all units over the
whole ``run_stage`` call, start-up included. ``speedup_2_workers`` is the steady one.
Repeats alternate 1 and 2 workers; medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common
from benchmarks.accuracy import BUDGETS, data_section, squeeze_section

NAME = "scaling"
TARGET = 1.8


def recover_config(output: Path, weights: str, ipc: int, iterations: int, workers: int) -> dict:
    budget = BUDGETS["quick"]
    data = data_section("fmnist", budget)
    return {
        "name": f"scaling-{workers}", "output": str(output), "seed": 0, "ipc": ipc,
        "data": data, "teachers": [{"model": "convnet", "weights": weights}],
        "select": {"num_candidates": 20, "num_crops": 2, "crop_scale": [0.5, 1.0]},
        "recover": {"method": "fadrm", "resolutions": [28] * 4,
                    "stage_iterations": [iterations] * 4, "lr": 0.05},
        "relabel": {"epochs": 1, "batch_size": 20},
        "execution": {"min_workers": workers, "max_workers": workers,
                      "threads_per_worker": 1, "max_failures": 0, "device": "cpu"},
    }


def timed_recover(cfg_dict: dict) -> dict:
    """Run select locally, then recover through Ray Train; unit finish times."""
    import ray

    from fadrm.config import load_config
    from fadrm.executors import LocalExecutor
    from fadrm.plan import RunPlan
    from fadrm.progress import StageProgress
    from ray_jobs.executor import RayTrainExecutor

    common.cache_data_loading()
    plan = RunPlan(load_config(cfg_dict))
    local = LocalExecutor("cpu")
    for stage in [*plan.squeeze.values(), plan.select]:
        local.run_stage(stage, stage.pending(), StageProgress(stage.name, 1, enabled=False))
    stage = plan.recover
    pending = stage.pending()
    finished: list[float] = []
    errors: list[BaseException] = []

    def watch(queue) -> None:
        try:
            for count in range(1, len(pending) + 1):
                ray.get(queue.wait_done.remote(count))
                finished.append(time.perf_counter())
        except BaseException as exc:  # noqa: BLE001 - the queue is killed at the end
            errors.append(exc)

    def on_queue(_stage, queue) -> None:
        threading.Thread(target=watch, args=(queue,), daemon=True).start()

    exe = RayTrainExecutor(plan.cfg, on_queue=on_queue)
    start = time.perf_counter()
    exe.run_stage(stage, pending, StageProgress("recover", len(pending), enabled=False))
    end = time.perf_counter()
    deadline = time.perf_counter() + 10
    while len(finished) < len(pending) and time.perf_counter() < deadline:
        time.sleep(0.05)
    if stage.pending():
        raise RuntimeError(f"recover left units pending: {stage.pending()}")
    workers = plan.cfg.execution.max_workers
    out = {"units": len(pending), "workers": workers, "wall_seconds": end - start,
           "wall_units_per_s": len(pending) / (end - start),
           "first_finish_s": finished[0] - start if finished else None}
    if len(finished) == len(pending) and len(pending) > workers:
        span = finished[-1] - finished[workers - 1]
        out["steady_units_per_s"] = (len(pending) - workers) / span
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ipc", type=int, default=None, help="units (one per IPC index)")
    parser.add_argument("--iterations", type=int, default=None, help="per MRO stage")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--work", type=Path, default=common.WORK)
    args = parser.parse_args(argv)

    ipc = args.ipc or (6 if args.quick else 12)
    iterations = args.iterations or (40 if args.quick else 150)
    repeats = args.repeats or (1 if args.quick else 3)
    info = common.machine_info()
    started = time.perf_counter()
    budget = copy.deepcopy(BUDGETS["quick"])
    weights = common.train_teachers(data_section("fmnist", budget), [{"model": "convnet"}],
                                    squeeze_section("fmnist", budget), args.work / "fmnist",
                                    "cpu")[0]
    runs = _time_workers(weights, ipc, iterations, repeats)

    def med(workers: int, key: str) -> float:
        return common.median(r[key] for r in runs[workers] if r.get(key) is not None)

    steady = {w: med(w, "steady_units_per_s") for w in (1, 2)}
    wall = {w: med(w, "wall_units_per_s") for w in (1, 2)}
    out = {
        "quick": args.quick, "machine": info,
        "setting": {"dataset": "fmnist", "teacher": "convnet", "units": ipc,
                    "iterations_per_unit": 4 * iterations, "threads_per_worker": 1,
                    "repeats": repeats},
        "speedup_2_workers": steady[2] / steady[1],
        "speedup_2_workers_wall": wall[2] / wall[1],
        "units_per_s": {"steady": {str(k): v for k, v in steady.items()},
                        "wall": {str(k): v for k, v in wall.items()}},
        "target": TARGET, "met": steady[2] / steady[1] >= TARGET,
        "runs": {str(k): v for k, v in runs.items()},
        "wall_seconds": time.perf_counter() - started,
    }
    _write(out, steady, wall)
    return out


def _time_workers(weights, ipc: int, iterations: int, repeats: int) -> dict[int, list[dict]]:
    """The recover stage with 1 and 2 Ray Train workers, alternating, ``repeats`` times."""
    import ray

    runs: dict[int, list[dict]] = {1: [], 2: []}
    try:
        for r in range(repeats):
            for workers in (1, 2):
                with tempfile.TemporaryDirectory(prefix="fadrm-scaling-") as tmp:
                    res = timed_recover(recover_config(Path(tmp), weights, ipc, iterations,
                                                       workers))
                runs[workers].append(res)
                print(f"[{NAME}] repeat {r + 1}, {workers} worker(s): steady "
                      f"{res.get('steady_units_per_s', float('nan')):.3f} units/s, wall "
                      f"{res['wall_units_per_s']:.3f} units/s ({res['wall_seconds']:.1f} s)",
                      flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return runs


def _write(out: dict, steady: dict, wall: dict) -> None:
    """``scaling.{json,md}`` and the headline on stdout."""
    results = common.results_dir(bool(out.get("quick")))
    common.write_json(NAME, out, results)
    table = common.markdown_table(
        ["workers", "steady units/s", "wall units/s (with start-up)"],
        [[w, steady[w], wall[w]] for w in (1, 2)], digits=3)
    setting = out["setting"]
    head = (f"Machine: {common.machine_line(out['machine'])}. "
            f"{'QUICK smoke size. ' if out['quick'] else ''}"
            f"Recover, {setting['units']} units x {setting['iterations_per_unit']} iterations, "
            f"1 thread per worker. "
            f"Speedup with 2 workers: {out['speedup_2_workers']:.2f}x steady, "
            f"{out['speedup_2_workers_wall']:.2f}x including Ray Train start-up.")
    common.write_markdown(NAME, "Scaling over Ray workers", [head, table], results)
    print(json.dumps({k: out[k] for k in ("speedup_2_workers", "speedup_2_workers_wall")},
                     indent=1))


if __name__ == "__main__":
    main()
