"""Soft-label storage: bytes per image-epoch of full fp16 logits vs top-k, and accuracy.

    python -m benchmarks.soft_labels             # CIFAR-10 IPC10, k in 0/1/2/3/5, 3 seeds (~20 min)
    python -m benchmarks.soft_labels --quick     # Fashion-MNIST, tiny budgets (~1 min)

The same distilled images (FADRM, IPC10) and the same views (same relabel seed) are
labelled with full fp16 logits (``relabel.top_k: 0``) and with the top-k logits plus the
mean of the rest; a student is trained on each (paired by seed) and evaluated on the
held-out validation set. Bytes are those of the zstd-compressed Arrow shards the relabel
stage wrote, per image-epoch, for the whole shard and for the label columns alone (the view
columns, ~20-30 bytes a row, are the same for every k).

Both data sets have 10 classes, where full logits cost only 20 bytes a row, so top-k cannot
save much. ``projection`` therefore also measures, on synthetic logits shaped like a
teacher's, the label-column bytes of full vs top-k for 100 and 1,000 classes (accuracy
cannot be measured here for those), and what a more compact *view* encoding would save
(crop as uint16 fractions, CutMix box as uint8, ids as uint16: a projection, not the
shipped schema).

Writes benchmarks/results/soft_labels.json: ``bytes_ratio`` and ``top1_delta`` of the
shipped default (``RelabelConfig().top_k``) against full fp16, plus every k measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from benchmarks import common
from benchmarks.accuracy import BUDGETS, data_section, run_config, squeeze_section

NAME = "soft_labels"
TARGET = {"bytes_ratio": 0.10, "top1_delta": -0.5}


def _shard_bytes(stage) -> tuple[int, list[str]]:
    from fadrm.formats import shards

    total, uris = 0, []
    for unit in stage.units():
        info = shards.shard_info(stage.unit_uri(unit))
        total += int(info["bytes"])
        uris.append(stage.unit_uri(unit))
    return total, uris


def _column_split(uris: list[str]) -> dict:
    """Compressed bytes of the view columns and of the label columns, over all shards."""
    from fadrm.formats import shards

    views = labels = rows = 0
    for uri in uris:
        table = shards.read_table(uri)
        names = table.column_names
        view_cols = names[:9]
        label_cols = names[9:]
        views += len(shards.table_bytes(table.select(view_cols)))
        labels += len(shards.table_bytes(table.select(label_cols)))
        rows += table.num_rows
    return {"view_bytes": views, "label_bytes": labels, "rows": rows}


def projection(rows: int = 20000, seed: int = 0) -> dict:
    """Label-column bytes per row, full fp16 vs top-k, for 10/100/1000 classes (synthetic).

    Logits: a teacher-like shape (one class well above a Gaussian tail), the same recipe
    for every class count; only compressed sizes are measured.
    """
    import pyarrow as pa
    import torch

    from fadrm.formats import shards
    from fadrm.formats.labels import index_type, label_arrays

    gen = torch.Generator().manual_seed(seed)
    out: dict = {}
    for classes in (10, 100, 1000):
        logits = torch.randn(rows, classes, generator=gen) * 2.0
        target = torch.randint(0, classes, (rows,), generator=gen)
        logits[torch.arange(rows), target] += 8.0
        sizes = {}
        for k in [0] + [k for k in (1, 2, 3, 5, 10, 20) if k < classes]:
            arrays = label_arrays(logits, k)
            names = ["logits"] if k == 0 else ["topk_index", "topk_value", "rest_value"]
            table = pa.Table.from_arrays(arrays, names=names)
            sizes[k] = len(shards.table_bytes(table)) / rows
        out[str(classes)] = {"bytes_per_row": {str(k): v for k, v in sizes.items()},
                             "ratio_to_full": {str(k): v / sizes[0] for k, v in sizes.items()},
                             "index_type": str(index_type(classes))}
    return out


def compact_views_projection(uri: str) -> dict:
    """View-column bytes per row as stored vs a compact encoding of the same views."""
    import numpy as np
    import pyarrow as pa

    from fadrm.formats import shards

    table = shards.read_table(uri)
    n = table.num_rows
    stored = len(shards.table_bytes(table.select(table.column_names[:9]))) / n

    def flat(name, width):
        col = table.column(name).combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)

    crop = np.round(flat("crop", 4) * 65535).astype(np.uint16)
    box = flat("mix_box", 4).astype(np.uint8)  # output pixels (< 256 for these sizes)
    compact = pa.table({
        "epoch": table.column("epoch").cast(pa.uint16()),
        "batch": table.column("batch").cast(pa.uint16()),
        "pos": table.column("pos").cast(pa.uint16()),
        "image_id": table.column("image_id").cast(pa.uint16()),
        "crop": pa.FixedSizeListArray.from_arrays(pa.array(crop.reshape(-1)), 4),
        "flip": table.column("flip"),
        "mix_partner": table.column("mix_partner").cast(pa.int16()),
        "mix_lam": table.column("mix_lam").cast(pa.float16()),
        "mix_box": pa.FixedSizeListArray.from_arrays(pa.array(box.reshape(-1)), 4),
    })
    return {"stored_view_bytes_per_row": stored,
            "compact_view_bytes_per_row": len(shards.table_bytes(compact)) / n}


def main(argv: list[str] | None = None) -> dict:
    from fadrm.config import RelabelConfig

    args = _parse_args(argv)
    budget = copy.deepcopy(BUDGETS["quick" if args.quick else "cpu"])
    if args.epochs:
        budget["epochs"] = args.epochs
    dataset = args.dataset or ("fmnist" if args.quick else "cifar10")
    ks = args.ks or [0, 1, 2, 3, 5]
    if 0 not in ks:
        ks = [0, *ks]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    threads = common.set_threads(args.threads)
    info = common.machine_info()
    started = time.perf_counter()

    weights = common.train_teachers(data_section(dataset, budget), [{"model": budget["teacher"]}],
                                    squeeze_section(dataset, budget), args.work / dataset,
                                    args.device)
    runs = [_measure(dataset, seed, k, args, budget, weights) for seed in seeds for k in ks]
    per_k = _per_k(runs, ks, seeds)
    default_k = RelabelConfig().top_k
    chosen = per_k.get(str(default_k), per_k["0"])
    within = [int(k) for k, v in per_k.items() if v["top1_delta_mean"] >= TARGET["top1_delta"]]
    smallest = min(within, key=lambda k: per_k[str(k)]["shard_bytes_per_image_epoch"])
    out = {
        "quick": args.quick, "machine": info, "threads": threads, "dataset": dataset,
        "ipc": args.ipc, "epochs": budget["epochs"], "seeds": seeds, "ks": ks,
        "student": budget["student"], "teacher": budget["teacher"],
        "default_top_k": default_k,
        "bytes_ratio": chosen["bytes_ratio_shard"],
        "bytes_ratio_labels": chosen["bytes_ratio_labels"],
        "top1_delta": chosen["top1_delta_mean"],
        "smallest_k_within_half_point": smallest,
        "smallest_k_bytes_ratio": per_k[str(smallest)]["bytes_ratio_shard"],
        "smallest_k_bytes_ratio_labels": per_k[str(smallest)]["bytes_ratio_labels"],
        "target": TARGET,
        "per_k": per_k,
        "projection_label_bytes": projection(),
        "compact_views": compact_views_projection(runs[0]["relabel_uris"][0]),
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    _write(out, common.results_dir(args.quick))
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dataset", choices=list(common.DATASETS), default=None)
    parser.add_argument("--ks", nargs="+", type=int, default=None, help="top-k values (0 = full)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=None, help="relabel / student epochs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--work", type=Path, default=common.WORK)
    return parser.parse_args(argv)


def _measure(dataset: str, seed: int, k: int, args, budget: dict, weights) -> dict:
    """One FADRM run labelled with top-``k`` (0: full fp16): its top-1 and shard bytes."""
    from fadrm.config import load_config
    from fadrm.plan import RunPlan

    cfg = run_config(dataset, "fadrm", args.ipc, seed, budget, weights,
                     args.work / dataset, args.device)
    cfg["relabel"]["top_k"] = k
    cfg["name"] = f"{cfg['name']}-top{k}"
    t0 = time.perf_counter()
    metrics = common.run_local(cfg, args.device)
    plan = RunPlan(load_config(cfg))
    total, uris = _shard_bytes(plan.relabel)
    split = _column_split(uris)
    image_epochs = plan.num_classes * args.ipc * budget["epochs"]
    print(f"[{NAME}] seed {seed} k={k}: top-1 {metrics['student_top1']:.2f} %, "
          f"{total / image_epochs:.1f} B/image-epoch (labels "
          f"{split['label_bytes'] / image_epochs:.1f})", flush=True)
    return {
        "seed": seed, "k": k, "top1": metrics["student_top1"],
        "shard_bytes_per_image_epoch": total / image_epochs,
        "label_bytes_per_image_epoch": split["label_bytes"] / image_epochs,
        "view_bytes_per_image_epoch": split["view_bytes"] / image_epochs,
        "seconds": time.perf_counter() - t0, "relabel_uris": uris,
    }


def _per_k(runs: list[dict], ks: list[int], seeds: list[int]) -> dict:
    """Per k: mean top-1, its paired delta against full fp16, bytes and their ratios."""
    per_k = {}
    full = {s: next(r for r in runs if r["seed"] == s and r["k"] == 0) for s in seeds}
    for k in ks:
        mine = [r for r in runs if r["k"] == k]
        deltas = [r["top1"] - full[r["seed"]]["top1"] for r in mine]
        per_k[str(k)] = {
            "top1_mean": common.mean_std([r["top1"] for r in mine])[0],
            "top1_delta_mean": common.mean_std(deltas)[0],
            "top1_delta_std": common.mean_std(deltas)[1],
            "shard_bytes_per_image_epoch": common.median(
                r["shard_bytes_per_image_epoch"] for r in mine),
            "label_bytes_per_image_epoch": common.median(
                r["label_bytes_per_image_epoch"] for r in mine),
        }
    f0 = per_k["0"]
    for k, v in per_k.items():
        v["bytes_ratio_shard"] = (v["shard_bytes_per_image_epoch"]
                                  / f0["shard_bytes_per_image_epoch"])
        v["bytes_ratio_labels"] = (v["label_bytes_per_image_epoch"]
                                   / f0["label_bytes_per_image_epoch"])
        v["meets_target"] = (v["bytes_ratio_shard"] <= TARGET["bytes_ratio"]
                             and v["top1_delta_mean"] >= TARGET["top1_delta"])
    return per_k


def _write(out: dict, results) -> None:
    """``soft_labels.{json,md}`` in ``results``, and the headline on stdout."""
    common.write_json(NAME, out, results)
    per_k = out["per_k"]
    table = common.markdown_table(
        ["k (0 = full fp16)", "B / image-epoch (shard)", "ratio", "label B / image-epoch",
         "label ratio", "top-1", "delta vs full (points)"],
        [[int(k), v["shard_bytes_per_image_epoch"], v["bytes_ratio_shard"],
          v["label_bytes_per_image_epoch"], v["bytes_ratio_labels"], v["top1_mean"],
          v["top1_delta_mean"]] for k, v in per_k.items()])
    proj = out["projection_label_bytes"]
    ptable = common.markdown_table(
        ["classes", "index type", "full B/row", *[f"top-{k} ratio" for k in (1, 5, 10, 20)]],
        [[c, p["index_type"], p["bytes_per_row"]["0"],
          *[p["ratio_to_full"].get(str(k)) for k in (1, 5, 10, 20)]] for c, p in proj.items()],
        digits=3)
    cv = out["compact_views"]
    head = (f"Machine: {common.machine_line(out['machine'])}. "
            f"{'QUICK smoke size. ' if out['quick'] else ''}"
            f"{out['dataset']}, FADRM IPC{out['ipc']}, {out['epochs']} epochs, student "
            f"{out['student']}, seeds {out['seeds']}. Shipped default "
            f"top_k={out['default_top_k']}: bytes "
            f"ratio {out['bytes_ratio']:.3f}, top-1 delta {out['top1_delta']:+.2f} points. "
            f"Smallest k within 0.5 points: {out['smallest_k_within_half_point']} (shard ratio "
            f"{out['smallest_k_bytes_ratio']:.3f}, label-column ratio "
            f"{out['smallest_k_bytes_ratio_labels']:.3f}).")
    notes = (f"Projection (synthetic teacher-like logits, label columns only):\n\n{ptable}\n\n"
             f"View columns: {cv['stored_view_bytes_per_row']:.1f} B/row as stored, "
             f"{cv['compact_view_bytes_per_row']:.1f} B/row with a compact encoding "
             f"(projection).")
    common.write_markdown(NAME, "Soft-label storage", [head, table, notes], results)
    print(json.dumps({k: out[k] for k in ("bytes_ratio", "bytes_ratio_labels", "top1_delta",
                                          "smallest_k_within_half_point")}, indent=1))


if __name__ == "__main__":
    main()
