"""`fadrm demo`: Fashion-MNIST IPC10, FADRM (or any method) against the random-real baseline.

Both methods go through the same relabel and student training, so the only difference is
how the 100 images were made. The teacher is trained once (squeeze) and shared. Each
method's report has its own name: ``runs/demo-<method>/`` (``--set recover.method=rded``
gives ``runs/demo-rded/``; ``--set name=...`` names it yourself).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fadrm.config import load_config

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


METHOD_LABELS = {"random-real": "random-real", "rded": "RDED", "sre2l": "SRe2L",
                 "fadrm": "FADRM", "fadrm+": "FADRM+"}
BASELINE = "random-real"


def run_demo(output: str = "runs/demo", overrides: list[str] | None = None,
             show_progress: bool = True, executor: str = "ray") -> int:
    from fadrm.plan import report_dir
    from fadrm.runner import print_summary, run_config

    base = [f"output={output}", *(overrides or [])]
    method_cfg = load_config("demo", base)
    if method_cfg.data.kind == "idx" and not Path(method_cfg.data.root).exists():
        print(f"Fashion-MNIST not found at {method_cfg.data.root}.\n"
              "Install it with: sudo apt-get install -y dataset-fashion-mnist\n"
              "or download the four IDX files and pass --set data.root=DIR", file=sys.stderr)
        return 2
    method = method_cfg.recover.method
    if not any(o.split("=", 1)[0].strip() == "name" for o in overrides or []):
        method_cfg = load_config("demo", [*base, f"name=demo-{method}"])
    # The baseline's own scores are not printed: it skips their hard-label run.
    baseline_cfg = load_config("demo", [*base, f"name=demo-{BASELINE}",
                                        f"recover.method={BASELINE}", "evaluate.scores=false"])
    runs = [("baseline", baseline_cfg)]
    if method != BASELINE or method_cfg.name != baseline_cfg.name:
        runs.append(("method", method_cfg))
    start = time.perf_counter()
    results = {}
    for role, cfg in runs:
        print(f"\n>>> {cfg.name}: {cfg.recover.method}", flush=True)
        results[role] = run_config(cfg, executor, show_progress=show_progress)
        print_summary(cfg, results[role])
    results.setdefault("method", results["baseline"])
    elapsed = time.perf_counter() - start
    label = METHOD_LABELS.get(method, method)
    top = results["method"]
    print(f"\nFashion-MNIST, IPC{method_cfg.ipc} ({top['num_images']} images), top-1 on the "
          f"{top['val_images']:,} test images")
    print(f"  {'teacher (' + method_cfg.teachers[0].model + ', full data)':<34} "
          f"{top['teacher_top1']:6.2f} %")
    print(f"  {'random-real + soft labels':<34} {results['baseline']['student_top1']:6.2f} %")
    if method != BASELINE:
        print(f"  {label + ' + soft labels':<34} {top['student_top1']:6.2f} %")
        margin = top["student_top1"] - results["baseline"]["student_top1"]
        # One seed says little at this size: the README gives the spread over seeds.
        print(f"  {label + ' over random-real':<34} {margin:+6.2f} points (seed "
              f"{method_cfg.seed}; spread over seeds: README, \"What the demo runs\")")
    scores = top.get("scores")
    if scores:
        print(f"  label-robust score (DD-Ranking, w = {scores['weight']}): LRS "
              f"{scores['lrs']:.2f} %  (IOR {scores['ior']:+.2f}, HLR {scores['hlr']:.2f}: hard "
              f"labels reach {scores['real_hard_top1']:.2f} % on the full data, "
              f"{scores['syn_hard_top1']:.2f} % on these {top['num_images']} images)")
    print(f"  total time {elapsed / 60:.1f} min")
    print(f"  grid:    {report_dir(method_cfg)}/grid.png")
    print("  metrics: " + ", ".join(f"{report_dir(cfg)}/metrics.json" for _, cfg in runs))
    return 0
