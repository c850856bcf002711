"""The run report: manifest.json, metrics.json, config.yaml and grid.png."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging

import torch
import yaml

from fadrm import __version__, shards, storage
from fadrm.config import config_to_dict

log = logging.getLogger("fadrm.report")

GRID_CLASSES, GRID_PER_CLASS = 20, 10


def render_grid(images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                max_per_class: int = 10, max_classes: int = 20) -> bytes:
    """PNG bytes: one row per class (class name on the left), up to ``max_per_class`` images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = sorted(set(labels.tolist()))[:max_classes]
    cols = max(min(max_per_class, int((labels == c).sum())) for c in shown)
    fig, axes = plt.subplots(len(shown), cols, figsize=(1.1 * cols + 1.4, 1.1 * len(shown)),
                             squeeze=False)
    for r, c in enumerate(shown):
        idx = torch.nonzero(labels == c).flatten()[:cols]
        for k in range(cols):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if k < len(idx):
                img = images[idx[k]].permute(1, 2, 0).numpy()
                if img.shape[2] == 1:
                    ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255)
                else:
                    ax.imshow(img)
        axes[r][0].set_ylabel(classes[c], rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def write_report(plan, timings: dict[str, float], repaired: list[dict] | None = None) -> dict:
    """Write the run's report under <output>/runs/<name>/ and return its metrics."""
    from fadrm.datasource import load_distilled

    ev = shards.read_json(plan.evaluate.unit_uri("student"))
    metrics = _metrics(plan, ev, timings)
    manifest = _manifest(plan, ev, metrics, timings, repaired or [])
    # The grid shows at most GRID_CLASSES classes x GRID_PER_CLASS images: read just those.
    shown = list(range(min(plan.num_classes, GRID_CLASSES)))
    images, labels = load_distilled(plan, shown, GRID_PER_CLASS)
    grid = render_grid(images, labels, plan.classes, GRID_PER_CLASS, GRID_CLASSES)
    run_dir = plan.run_dir
    storage.write_bytes_atomic(storage.join(run_dir, "grid.png"), grid)
    storage.write_bytes_atomic(storage.join(run_dir, "config.yaml"),
                               yaml.safe_dump(config_to_dict(plan.cfg), sort_keys=False).encode())
    storage.write_bytes_atomic(storage.join(run_dir, "metrics.json"),
                               json.dumps(metrics, indent=2).encode())
    # The manifest goes last: its presence means the report is complete.
    storage.write_bytes_atomic(storage.join(run_dir, "manifest.json"),
                               json.dumps(manifest, indent=2).encode())
    return metrics


def _metrics(plan, ev: dict, timings: dict[str, float]) -> dict:
    """metrics.json: the headline numbers of the run."""
    cfg = plan.cfg
    return {
        "name": cfg.name,
        "method": cfg.recover.method,
        "ipc": cfg.ipc,
        "num_classes": plan.num_classes,
        "num_images": plan.num_classes * cfg.ipc,
        **{k: ev[k] for k in ("teacher_top1", "teachers_top1", "student_top1",
                              "student_top1_best", "student_top5", "best_epoch",
                              "val_images")},
        "stage_seconds": timings,
    }


def _teachers(plan) -> list[dict]:
    cfg = plan.cfg
    teachers = []
    for i, t in enumerate(cfg.teachers):
        uri = plan.teacher_uri(i)
        entry = {"model": t.model, "fingerprint": plan._teacher_fp[i], "uri": uri,
                 "recover": i in cfg.recover_teachers, "relabel": i in cfg.relabel_teachers}
        if uri is not None:
            entry["sha256"] = plan.teacher_sha256(i)
        teachers.append(entry)
    return teachers


def _manifest(plan, ev: dict, metrics: dict, timings: dict[str, float],
              repaired: list[dict]) -> dict:
    """manifest.json: config, fingerprints, stage keys, every shard, what was skipped."""
    outputs = []
    for stage in plan.stages:
        outputs += stage.outputs()
    return {
        "name": plan.cfg.name,
        "version": __version__,
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config_to_dict(plan.cfg),
        "fingerprints": plan.fingerprints(),
        "teachers": _teachers(plan),
        "stages": {s.label: {"key": s.key.key, "components": s.key.components, "dir": s.dir}
                   for s in plan.stages},
        "shards": outputs,
        "skipped_inputs": ev["skipped_inputs"],
        "num_skipped_inputs": len(ev["skipped_inputs"]),
        "stage_seconds": timings,
        "repaired_outputs": repaired,
        "metrics": metrics,
    }
