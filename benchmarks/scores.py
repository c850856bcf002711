"""Label-robust scores (DD-Ranking's HLR, IOR, LRS) of FADRM at the accuracy benchmark's
setting: CIFAR-10 IPC10, ``cpu`` budget, several seeds.

    python -m benchmarks.scores                      # CIFAR-10 IPC10, seeds 0 1 2 (~1 h, 2 cores)
    python -m benchmarks.scores --quick              # Fashion-MNIST slice, tiny budget (~1 min)

Each seed is the accuracy benchmark's ``fadrm`` run with ``evaluate.scores: true``: the
pipeline itself runs what the scores need (random real with the same soft labels, the same
images with hard labels, the student model trained on the full training set by the squeeze
recipe, seeded like the run) and reports them; nothing here computes a score. Teachers are
the accuracy benchmark's (trained once, seed 0, shared; reused from its work folder).
Resumable: finished runs are cached by their keys.

Writes benchmarks/results/scores.json (per seed and mean +- std) and scores.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import accuracy, common

NAME = "scores"
FIELDS = ("syn_top1", "random_real_top1", "syn_hard_top1", "real_hard_top1", "hlr", "ior",
          "lrs")


def seed_config(dataset: str, ipc: int, seed: int, budget: dict, weights: list[str],
                work: Path, device: str) -> dict:
    """The accuracy benchmark's FADRM run, asking for scores; the full-data run trains the
    student model by the teachers' squeeze recipe."""
    cfg = accuracy.run_config(dataset, "fadrm", ipc, seed, budget, weights, work, device)
    cfg["squeeze"] = accuracy.squeeze_section(dataset, budget)
    cfg["evaluate"] = {"scores": True}
    return cfg


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for field in FIELDS:
        mean, std = common.mean_std([s[field] for s in per_seed])
        out[field] = {"mean": round(mean, 2), "std": round(std, 2)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--work", type=Path, default=common.WORK)
    args = parser.parse_args(argv)
    budget_name = "quick" if args.quick else "cpu"
    dataset = "fmnist" if args.quick else "cifar10"
    budget = accuracy.BUDGETS[budget_name]
    threads = common.set_threads(args.threads)
    work = args.work / dataset
    data = accuracy.data_section(dataset, budget)
    started = time.perf_counter()
    weights = common.train_teachers(data, [{"model": budget["teacher"]}],
                                    accuracy.squeeze_section(dataset, budget), work,
                                    args.device)
    per_seed = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        print(f"[{NAME}] {dataset} IPC{args.ipc} seed {seed}", flush=True)
        metrics = common.run_local(seed_config(dataset, args.ipc, seed, budget, weights, work,
                                               args.device), args.device)
        row = {"seed": seed, **{f: metrics["scores"][f] for f in FIELDS},
               "teacher_top1": metrics["teacher_top1"],
               "minutes": round((time.perf_counter() - t0) / 60, 1)}
        print(f"[{NAME}] seed {seed}: " + ", ".join(f"{f} {row[f]}" for f in FIELDS), flush=True)
        per_seed.append(row)
    result = {
        "dataset": dataset, "ipc": args.ipc, "budget_name": budget_name, "budget": budget,
        "seeds": args.seeds, "per_seed": per_seed, "mean_std": summarise(per_seed),
        "definition": "DD-Ranking label-robust score, w = 0.5 (fadrm.scores)",
        "machine": common.machine_info(), "threads": threads,
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    if not args.quick:
        common.write_json(NAME, result)
        ms = result["mean_std"]
        table = common.markdown_table(
            ["", *FIELDS], [[f"seed {r['seed']}", *(r[f] for f in FIELDS)]
                            for r in per_seed]
            + [["mean +- std", *(f"{ms[f]['mean']:.2f} +- {ms[f]['std']:.2f}" for f in FIELDS)]])
        common.write_markdown(NAME, f"Label-robust scores, {dataset} IPC{args.ipc}", [table])
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
