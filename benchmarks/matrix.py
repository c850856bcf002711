"""The evaluation matrix over Ray workers: 2 student models x 2 seeds on the demo's data.

    python -m benchmarks.matrix            # the demo's budget (~8 min on 2 CPU cores)
    python -m benchmarks.matrix --quick    # tiny (~2 min)

Everything before the student (the demo's squeeze, select, recover, relabel; Fashion-MNIST
IPC10) runs once, locally. Then the evaluate stage of a 2-model x 2-seed matrix runs through
``ray_jobs.executor.RayTrainExecutor`` on an embedded Ray instance with 1 worker (the four
units one after another), and again, from nothing, with 2 workers (1 thread each).
``wall_ratio`` is the evaluate stage's seconds with 2 workers over those with 1 (target
<= 0.6). ``unit_slowdown_2_workers``: the units' summed training seconds with 2 workers over
those with 1 (two units training side by side share the machine); ``wall_ratio_bound``: half
of it, the ratio that no scheduling can beat on this machine. Each unit's student weights
are then compared, byte for byte, with a run whose student is that one (model, seed) alone
(``identical_to_alone``) and across the two worker counts (``identical_across_workers``).

Writes benchmarks/results/matrix.json.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "matrix"
TARGETS = {"wall_ratio": 0.6}
MODELS = ["convnet", "convnet_w128"]
SEEDS = [0, 1]


def _overrides(output: Path, quick: bool) -> list[str]:
    sets = [f"output={output}", "name=matrix", "execution.threads_per_worker=1",
            "execution.max_failures=0", "evaluate.scores=false"]
    if quick:
        sets += ["data.max_train_per_class=300", "data.max_val=1000", "squeeze.epochs=1",
                 "select.num_candidates=20", "recover.stage_iterations=[5,5,5,5]",
                 "relabel.epochs=20", "relabel.epochs_per_shard=20", "student.eval_every=0"]
    return sets


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> dict:
    import ray

    from fadrm.config import load_config
    from fadrm.executors import LocalExecutor
    from fadrm.plan import RunPlan
    from fadrm.runner import run_pipeline
    from ray_jobs.executor import RayTrainExecutor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fadrm-matrix-"))
    base = _overrides(work, args.quick)
    matrix = [f"student.model={MODELS}".replace("'", ""), f"student.seeds={SEEDS}"]
    try:
        # The distilled set (and one student) once, in this process.
        run_pipeline(load_config("demo", base), LocalExecutor("cpu"), show_progress=False)
        seconds, weights, unit_seconds = {}, {}, {}
        for workers in (1, 2):
            cfg = load_config("demo", [*base, *matrix, f"execution.min_workers={workers}",
                                       f"execution.max_workers={workers}"])
            plan = RunPlan(cfg)
            shutil.rmtree(plan.evaluate.dir, ignore_errors=True)  # from nothing each time
            try:
                metrics = run_pipeline(cfg, RayTrainExecutor(cfg), show_progress=False)
            finally:
                ray.shutdown()
            seconds[workers] = metrics["stage_seconds"]["evaluate"]
            units = plan.evaluate.unit_metrics()
            weights[workers] = {u: _sha(plan.evaluate.weights_uri(u)) for u in units}
            unit_seconds[workers] = round(sum(m["student_train_seconds"]
                                              for m in units.values()), 2)
            workers_seen = sorted({m["worker"] for m in units.values()})
            print(f"[{NAME}] {workers} worker(s): evaluate {seconds[workers]:.1f} s, units on "
                  f"{len(workers_seen)} worker(s)", flush=True)
        alone = {}
        for model in MODELS:
            for seed in SEEDS:
                cfg = load_config("demo", [*base, f"student.model={model}",
                                           f"student.seeds=[{seed}]"])
                run_pipeline(cfg, LocalExecutor("cpu"), show_progress=False)
                ev = RunPlan(cfg).evaluate
                unit = ev.units()[0]
                alone[unit] = _sha(ev.weights_uri(unit))
        result = {
            "quick": args.quick, "models": MODELS, "seeds": SEEDS,
            "evaluate_seconds": {str(k): v for k, v in seconds.items()},
            "wall_ratio": round(seconds[2] / seconds[1], 3),
            # The units' own training seconds, summed: with 2 workers they train side by
            # side, and each is slower by what two busy cores cost this machine.
            "unit_train_seconds": {str(k): v for k, v in unit_seconds.items()},
            "unit_slowdown_2_workers": round(unit_seconds[2] / unit_seconds[1], 3),
            # The wall ratio with no fixed cost and perfect balance, at that slowdown.
            "wall_ratio_bound": round(unit_seconds[2] / unit_seconds[1] / 2, 3),
            "identical_across_workers": weights[1] == weights[2],
            "identical_to_alone": weights[2] == alone,
            "targets": TARGETS, "machine": common.machine_info(),
        }
        result["met"] = result["wall_ratio"] <= TARGETS["wall_ratio"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.quick:
        common.write_json(NAME, result)
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
