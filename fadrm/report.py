"""The run report: manifest.json, metrics.json, config.yaml, grid.png (and students.png).

Each config has its own report, ``<output>/runs/<name>/<config fingerprint>/``, so the
``--set`` variants of a run keep their results side by side; ``runs/<name>/latest`` is the
newest of them (a relative symlink on local storage, a copy on object storage).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os

import torch
import yaml

from fadrm import __version__, storage
from fadrm.config import config_to_dict
from fadrm.formats import shards

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


REPORT_FILES = ("grid.png", "students.png", "config.yaml", "metrics.json",
                "manifest.json")  # manifest last
OPTIONAL_FILES = ("students.png",)  # only with an evaluation matrix


def write_report(plan, timings: dict[str, float | None], repaired: list[dict] | None = None,
                 cached: list[str] | None = None, scores: dict | None = None) -> dict:
    """Write the run's report under <output>/runs/<name>/<config fingerprint>/, point
    runs/<name>/latest at it, and return its metrics.

    ``timings``: each stage's seconds; for the stages in ``cached`` (outputs reused from an
    earlier run) the seconds they took when they were computed (None when unknown).
    ``scores``: the label-robust scores (:func:`fadrm.runner.run_scores`), when asked for.
    """
    from fadrm.datasource import load_distilled

    units = plan.evaluate.unit_metrics()
    ev = next(iter(units.values()))  # the headline student (the matrix's first)
    # Each teacher trained here lists the training set's unreadable files: each file once.
    once = {str(s.get("path")): s for s in ev.get("skipped_inputs", [])}
    ev = {**ev, "skipped_inputs": list(once.values())}
    metrics = _metrics(plan, ev, timings, cached or [])
    if scores is not None:
        metrics["scores"] = scores
    if plan.cfg.student.is_matrix:
        metrics["students"] = _students(plan, units, metrics)
    manifest = _manifest(plan, ev, metrics, timings, repaired or [])
    # The grid shows at most GRID_CLASSES classes x GRID_PER_CLASS images: read just those.
    shown = list(range(min(plan.num_classes, GRID_CLASSES)))
    images, labels = load_distilled(plan, shown, GRID_PER_CLASS)
    grid = render_grid(images, labels, plan.classes, GRID_PER_CLASS, GRID_CLASSES)
    run_dir = plan.run_dir
    storage.write_bytes_atomic(storage.join(run_dir, "grid.png"), grid)
    if "students" in metrics:
        from fadrm.matrix import render_students

        title = f"{plan.cfg.name}: {plan.cfg.recover.method} IPC{plan.cfg.ipc}, final top-1"
        storage.write_bytes_atomic(storage.join(run_dir, "students.png"),
                                   render_students(metrics["students"], title))
    storage.write_bytes_atomic(storage.join(run_dir, "config.yaml"),
                               yaml.safe_dump(config_to_dict(plan.cfg), sort_keys=False).encode())
    storage.write_bytes_atomic(storage.join(run_dir, "metrics.json"),
                               json.dumps(metrics, indent=2).encode())
    # The manifest goes last: its presence means the report is complete.
    storage.write_bytes_atomic(storage.join(run_dir, "manifest.json"),
                               json.dumps(manifest, indent=2).encode())
    point_latest(plan)
    return metrics


def point_latest(plan) -> None:
    """Make runs/<name>/latest the report of ``plan``'s config: a relative symlink,
    replaced atomically, on local storage; elsewhere (no symlinks) a copy of the report's
    files, manifest last."""
    target, latest = plan.run_dir, plan.latest_dir
    local = storage.local_path(latest)
    if local is not None:
        tmp = local.parent / f".latest.{storage.unique_suffix()}"
        try:
            os.symlink(os.path.basename(target.rstrip("/")), tmp, target_is_directory=True)
            if local.is_dir() and not local.is_symlink():
                import shutil

                shutil.rmtree(local)  # a copy made where symlinks were unavailable
            os.replace(tmp, local)
            return
        except OSError as exc:  # a filesystem without symlinks: copy instead
            tmp.unlink(missing_ok=True)
            log.debug("no symlink for %s (%s); copying the report", latest, exc)
    for name in REPORT_FILES:
        if name in OPTIONAL_FILES and not storage.exists(storage.join(target, name)):
            continue
        storage.write_bytes_atomic(storage.join(latest, name),
                                   storage.read_bytes(storage.join(target, name)))


def _metrics(plan, ev: dict, timings: dict[str, float | None], cached: list[str]) -> dict:
    """metrics.json: the headline numbers of the run."""
    cfg = plan.cfg
    return {
        "name": cfg.name,
        "config_fingerprint": plan.fingerprints()["config"],
        "method": cfg.recover.method,
        "ipc": cfg.ipc,
        "num_classes": plan.num_classes,
        "num_images": plan.num_classes * cfg.ipc,
        **{k: ev[k] for k in ("teacher_top1", "teachers_top1", "student_top1",
                              "student_top1_best", "student_top5", "best_epoch",
                              "val_images")},
        # best_epoch counts from 0 (as the history and the relabel shards e0000-0049 do).
        "epochs": cfg.relabel.epochs,
        "stage_seconds": timings,
        "cached_stages": list(cached),
        "num_skipped_inputs": len(ev["skipped_inputs"]),
        "warnings": run_warnings(plan, ev),
        # Only for the data-parallel variant (the paper's step keeps today's report).
        **({"student_step": ev["student_step"]} if "student_step" in ev else {}),
    }


def run_warnings(plan, ev: dict) -> list[str]:
    """What the run's numbers should not hide, one line each (logged, in metrics.json and
    in the summary): a teacher no better than chance on the validation set (wrong weights,
    normalisation or class order), and the unreadable inputs skipped, per data root."""
    out = []
    chance = 100.0 / plan.num_classes
    for i, top1 in enumerate(ev.get("teachers_top1") or []):
        if top1 is not None and top1 <= chance:
            out.append(f"teachers[{i}] ({plan.cfg.teachers[i].model}): validation top-1 "
                       f"{top1:.2f} % is not above chance ({chance:.2f} % for "
                       f"{plan.num_classes} classes); check its weights, data.mean/std and "
                       f"the class order")
    skipped = ev.get("skipped_inputs") or []
    if skipped:
        roots = _skipped_roots(plan.cfg.data, skipped)
        where = ", ".join(f"{n} under {key} {root}" for (key, root), n in roots.items())
        out.append(f"{len(skipped)} unreadable input(s) skipped ({where}); listed in "
                   f"manifest.json skipped_inputs")
    for line in out:
        log.warning("%s: %s", plan.cfg.name, line)
    return out


def _skipped_roots(data, skipped: list[dict]) -> dict[tuple[str, str], int]:
    """How many skipped inputs lie under each configured data root (``data.root``,
    ``data.val_root``)."""
    roots = [("data.val_root", data.val_root), ("data.root", data.root)]
    roots = [(key, root) for key, root in roots if root]
    counts: dict[tuple[str, str], int] = {}
    for entry in skipped:
        path = str(entry.get("path", ""))
        # The longest root that holds the path (a val_root may lie inside root).
        hit = max((r for r in roots if path.startswith(r[1].rstrip("/") + "/")),
                  key=lambda r: len(r[1]), default=("data.root", data.root))
        counts[hit] = counts.get(hit, 0) + 1
    return counts


def _students(plan, units: dict[str, dict], metrics: dict) -> dict:
    """The evaluation matrix: per model, top-1 over seeds and the margin over a random-real
    run of the same protocol and matrix, where one exists."""
    from fadrm.matrix import add_margins, summarise

    students = summarise(units)
    random_real = find_random_real(plan, metrics) if plan.cfg.recover.method != "random-real" \
        else {"students": students}
    add_margins(students, (random_real or {}).get("students"))
    return students


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
        "cached_stages": metrics["cached_stages"],
        "repaired_outputs": repaired,
        "metrics": metrics,
    }


def find_random_real(plan, metrics: dict) -> dict | None:
    """The newest random-real report under the run's output with the same data, IPC,
    teachers, relabel and student settings (the same soft-label protocol), as
    ``{"name", "config_fingerprint", "student_top1", "margin"}``; None when there is none
    (or the run is random-real itself)."""
    cfg = plan.cfg
    if cfg.recover.method == "random-real":
        return None
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(storage.join(cfg.output, "runs"))
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    ours = config_to_dict(cfg)
    fps = plan.fingerprints()
    best = None
    for info in infos:
        if info.base_name != "manifest.json" or info.type != pafs.FileType.File:
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                other = json.loads(f.read())
        except (OSError, ValueError):
            continue
        c = other.get("config") or {}
        same = (c.get("recover", {}).get("method") == "random-real"
                and c.get("ipc") == cfg.ipc
                and other.get("fingerprints", {}).get("data") == fps["data"]
                and other.get("fingerprints", {}).get("teachers") == fps["teachers"]
                and c.get("relabel") == ours["relabel"] and c.get("student") == ours["student"]
                and c.get("seed") == cfg.seed)
        if same and (best is None or other.get("written", "") > best.get("written", "")):
            best = other
    if best is None:
        return None
    top1 = best["metrics"]["student_top1"]
    return {"name": best["name"], "config_fingerprint": best["fingerprints"]["config"],
            "student_top1": top1, "margin": metrics["student_top1"] - top1,
            "students": best["metrics"].get("students")}
