"""Per-stage overhead: the demo with one worker group for all stages, and with one per stage.

    python -m benchmarks.worker_group            # the demo config, twice per mode (~30 min)
    python -m benchmarks.worker_group --quick    # a tiny config (~4 min)

Each run is ``fadrm demo`` (random-real baseline, then FADRM; Fashion-MNIST IPC10, 2 Ray
workers on an embedded Ray instance) from an empty output folder, in a fresh process, with
``execution.worker_group`` set to ``per_stage`` (a Ray Train worker group started for each
stage: the behaviour before issue 9) or ``shared`` (one group runs all the stages of a
config). The modes alternate (per_stage, shared, per_stage, shared) so that a change of
machine load hits both. Recorded: wall seconds of the whole demo, each stage's seconds, and
the student top-1 of both configs, which must be identical in both modes (the same units
produce the same bytes whichever workers run them).

``saving_seconds``: median wall of per_stage - median wall of shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

NAME = "worker_group"
MODES = ("per_stage", "shared")
# The quick size: a few seconds of work per stage, so the start-up is most of the time.
QUICK = ["ipc=2", "squeeze.epochs=1", "data.max_train_per_class=300", "data.max_val=1000",
         "select.num_candidates=20", "recover.stage_iterations=[5,5,5,5]",
         "relabel.epochs=20", "relabel.epochs_per_shard=10", "student.eval_every=0"]


def child(mode: str, output: str, quick: bool) -> None:
    """Run the demo once (in this fresh process) and emit its figures."""
    from fadrm.demo import run_demo

    overrides = [f"execution.worker_group={mode}", *(QUICK if quick else [])]
    start = time.perf_counter()
    code = run_demo(output=output, overrides=overrides, show_progress=False)
    wall = time.perf_counter() - start
    if code:
        raise SystemExit(code)
    runs = {}
    for name in ("demo-random-real", "demo-fadrm"):
        metrics = json.loads((Path(output) / "runs" / name / "latest" / "metrics.json")
                             .read_text())
        runs[name] = {"student_top1": metrics["student_top1"],
                      "stage_seconds": metrics["stage_seconds"]}
    common.emit({"mode": mode, "wall_seconds": round(wall, 2), "runs": runs,
                 "load_average_after": os.getloadavg()[0]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker_group")
    parser.add_argument("--quick", action="store_true", help="tiny config")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per mode (default 2; --quick: 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results; --quick: "
                             "benchmarks/work/results-quick)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.quick)
        return 0
    repeats = args.repeats or (1 if args.quick else 2)
    root = Path(tempfile.mkdtemp(prefix="fadrm-worker-group-"))
    runs = []
    try:
        for i in range(repeats):
            for mode in MODES:
                output = root / f"{mode}-{i}"
                extra = ["--quick"] if args.quick else []
                runs.append(common.run_child("benchmarks.worker_group",
                                             [*extra, "--child", mode, str(output)]))
                print(json.dumps(runs[-1]), flush=True)
                shutil.rmtree(output, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    walls = {m: [r["wall_seconds"] for r in runs if r["mode"] == m] for m in MODES}
    tops = {m: [{k: v["student_top1"] for k, v in r["runs"].items()}
                for r in runs if r["mode"] == m] for m in MODES}
    same = all(t == tops["per_stage"][0] for m in MODES for t in tops[m])
    saving = common.median(walls["per_stage"]) - common.median(walls["shared"])
    result = {
        "quick": args.quick, "repeats": repeats, "machine": common.machine_info(),
        "runs": runs, "wall_seconds": walls,
        "saving_seconds": round(saving, 1),
        "saving_fraction": round(saving / common.median(walls["per_stage"]), 3),
        "same_student_top1": same,
    }
    path = common.write_json(NAME, result, common.results_dir(args.quick, args.out))
    print(f"demo wall: per_stage {walls['per_stage']} s, shared {walls['shared']} s; "
          f"saving {saving:.0f} s; same results: {same}; wrote {path}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
