"""Why FADRM does not beat random real images in the demo: one knob at a time.

    python -m benchmarks.demo_analysis                  # seeds 0 1, every variant (~35 min)
    python -m benchmarks.demo_analysis --seeds 0 1 2    # more seeds (resumes)
    python -m benchmarks.demo_analysis --quick          # smoke size (~3 min)

The demo's own config (``fadrm/presets/demo.yaml``: Fashion-MNIST IPC10, ConvNet teacher
and student, 4 x 100 recover iterations, 300 relabel/student epochs), run in this process
(LocalExecutor). One teacher (squeeze, seed 0) is shared by every run, as in
``benchmarks.accuracy``; the seed varies selection, recover, the stored views and the
student. Variants, each changing one thing against ``fadrm``:

* ``random-real``: random real images (the baseline the demo prints);
* ``rded``: realism-selected patches, no pixel optimisation (selection alone);
* ``fadrm``: the demo as shipped;
* ``fadrm-m10``: select from only 10 candidates per class (= IPC), so every candidate is
  kept (its best crop): the selection does not narrow the set to the easiest images;
* ``fadrm-iters1000``: 4 x 250 recover iterations (2.5 x the demo's budget);
* ``fadrm-crop08``: patches of 8-100 % of the image area (the paper's RandomResizedCrop
  scale) instead of the demo's 50-100 %.

Writes benchmarks/results/demo_analysis.json (per run, and per variant mean / std over
seeds with the margin over random-real) and demo_analysis.md. Resumes: runs already
measured are skipped.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from benchmarks import common

NAME = "demo_analysis"
VARIANTS: dict[str, list[str]] = {
    "random-real": ["recover.method=random-real"],
    "rded": ["recover.method=rded"],
    "fadrm": [],
    "fadrm-m10": ["select.num_candidates=10"],
    "fadrm-iters1000": ["recover.stage_iterations=[250,250,250,250]"],
    "fadrm-crop08": ["select.crop_scale=[0.08,1.0]"],
}
QUICK = ["data.max_train_per_class=300", "data.max_val=1000", "squeeze.epochs=1",
         "select.num_candidates=20", "recover.stage_iterations=[5,5,5,5]",
         "relabel.epochs=10", "relabel.epochs_per_shard=10", "student.eval_every=0"]


def _config(overrides: list[str]) -> dict:
    from fadrm.config import config_to_dict, load_config

    return config_to_dict(load_config("demo", overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_analysis")
    parser.add_argument("--quick", action="store_true", help="smoke size")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=common.WORK / "demo_analysis")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results; --quick: "
                             "benchmarks/work/results-quick)")
    args = parser.parse_args(argv)
    common.set_threads(None)
    results = common.results_dir(args.quick, args.out)
    work = args.work / ("quick" if args.quick else "default")
    base = [f"output={work}", *(QUICK if args.quick else [])]
    state = common.read_json(NAME, results) or {}
    if state.get("quick") != args.quick:
        state = {}
    runs = state.get("runs", [])
    done = {(r["variant"], r["seed"]) for r in runs}

    # One teacher for all runs: the demo's squeeze stage at seed 0.
    teacher_cfg = _config([*base, "name=demo-teacher", "seed=0"])
    weights = common.train_teachers(teacher_cfg["data"], teacher_cfg["teachers"],
                                    teacher_cfg["squeeze"], work)[0]
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed) in done:
                continue
            cfg = _config([*base, f"name=analysis-{variant}-s{seed}", f"seed={seed}",
                           f"teachers[0].weights={weights}", *VARIANTS[variant]])
            start = time.perf_counter()
            metrics = common.run_local(copy.deepcopy(cfg), "cpu")
            runs.append({"variant": variant, "seed": seed, "overrides": VARIANTS[variant],
                         "top1": metrics["student_top1"],
                         "teacher_top1": metrics["teacher_top1"],
                         "seconds": round(time.perf_counter() - start, 1),
                         "stage_seconds": metrics["stage_seconds"]})
            print(f"[{NAME}] {variant:>16} seed {seed}: top-1 {runs[-1]['top1']:.2f} % "
                  f"in {runs[-1]['seconds']:.0f} s", flush=True)
            _write(results, args.quick, runs)
    _write(results, args.quick, runs)
    return 0


def _summary(runs: list[dict]) -> list[dict]:
    rows = []
    baseline = {r["seed"]: r["top1"] for r in runs if r["variant"] == "random-real"}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        mean, std = common.mean_std([r["top1"] for r in mine])
        paired = [r["top1"] - baseline[r["seed"]] for r in mine if r["seed"] in baseline]
        margin = common.mean_std(paired) if paired else (None, None)
        rows.append({"variant": variant, "overrides": VARIANTS[variant], "seeds": len(mine),
                     "top1_mean": round(mean, 2), "top1_std": round(std, 2),
                     "margin_over_random_real": None if margin[0] is None
                     else round(margin[0], 2),
                     "margin_std": None if margin[1] is None else round(margin[1], 2)})
    return rows


def _write(results: Path, quick: bool, runs: list[dict]) -> None:
    rows = _summary(runs)
    common.write_json(NAME, {"quick": quick, "machine": common.machine_info(), "runs": runs,
                             "rows": rows}, results)
    table = common.markdown_table(
        ["variant", "change", "seeds", "top-1 mean", "std", "vs random-real (paired)"],
        [[r["variant"], " ".join(r["overrides"]) or "(demo as shipped)", r["seeds"],
          r["top1_mean"], r["top1_std"],
          "" if r["margin_over_random_real"] is None
          else f"{r['margin_over_random_real']:+.2f} ± {r['margin_std']:.2f}"]
         for r in rows])
    common.write_markdown(NAME, "Demo analysis (Fashion-MNIST IPC10, demo budgets)",
                          [common.machine_line(common.machine_info()), table], results)


if __name__ == "__main__":
    raise SystemExit(main())
