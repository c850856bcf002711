"""`fadrm demo`: Fashion-MNIST IPC10, FADRM against the random-real baseline.

Both methods go through the same relabel and student training, so the only difference is
how the 100 images were made. The teacher is trained once (squeeze) and shared.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fadrm.config import load_config

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def run_demo(output: str = "runs/demo", overrides: list[str] | None = None,
             show_progress: bool = True, executor: str = "ray") -> int:
    from fadrm.runner import print_summary, run_config

    base = [f"output={output}", *(overrides or [])]
    fadrm_cfg = load_config("demo", base)
    if fadrm_cfg.data.kind == "idx" and not Path(fadrm_cfg.data.root).exists():
        print(f"Fashion-MNIST not found at {fadrm_cfg.data.root}.\n"
              "Install it with: sudo apt-get install -y dataset-fashion-mnist\n"
              "or download the four IDX files and pass --set data.root=DIR", file=sys.stderr)
        return 2
    baseline_cfg = load_config("demo", [*base, "name=demo-random-real",
                                        "recover.method=random-real"])
    start = time.perf_counter()
    results = {}
    for cfg in (baseline_cfg, fadrm_cfg):
        print(f"\n>>> {cfg.name}: {cfg.recover.method}", flush=True)
        results[cfg.recover.method] = run_config(cfg, executor, show_progress=show_progress)
        print_summary(cfg, results[cfg.recover.method])
    elapsed = time.perf_counter() - start
    fa, rr = results["fadrm"], results["random-real"]
    print("\nFashion-MNIST, IPC10 (100 images), top-1 on the 10,000 test images")
    print(f"  {'teacher (' + fadrm_cfg.teachers[0].model + ', full data)':<34} "
          f"{fa['teacher_top1']:6.2f} %")
    print(f"  {'random-real + soft labels':<34} {rr['student_top1']:6.2f} %")
    print(f"  {'FADRM + soft labels':<34} {fa['student_top1']:6.2f} %")
    print(f"  total time {elapsed / 60:.1f} min")
    print(f"  grid:    {output}/runs/{fadrm_cfg.name}/grid.png")
    print(f"  metrics: {output}/runs/{fadrm_cfg.name}/metrics.json, "
          f"{output}/runs/{baseline_cfg.name}/metrics.json")
    return 0
