"""Part 4 of the check: the whole pipeline (squeeze, select, recover, relabel, evaluate) on
the device through the local executor, FADRM+ with a torchvision teacher (trained by a
one-epoch squeeze) and a timm teacher (given weights), on a synthetic 224 px ImageFolder."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from pathlib import Path

from benchmarks.gpu.common import (MEAN, STD, TIMM_TEACHER, Sizes, make_image_folder,
                                   report_dir)

log = logging.getLogger("gpu_check")


def gpu_pipeline_config(output: Path, data_root: Path, timm_weights: Path,
                        device: str) -> dict:
    """FADRM+ at 224 px with one torchvision teacher (squeezed) and one timm teacher (given)."""
    return {
        "name": "gpu-check",
        "output": str(output),
        "seed": 0,
        "ipc": 2,
        "data": {"kind": "imagefolder", "root": str(data_root), "val_per_class": 2,
                 "resolution": 224, "channels": 3, "mean": MEAN, "std": STD},
        "teachers": [{"model": "torchvision:resnet18"},
                     {"model": TIMM_TEACHER, "weights": str(timm_weights)}],
        "squeeze": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "select": {"num_candidates": 4, "num_crops": 2},
        "recover": {"method": "fadrm+", "resolutions": [200, 224, 200, 224],
                    "stage_iterations": [2, 2, 2, 2], "lr": 0.25, "jitter": 32},
        "relabel": {"epochs": 2, "batch_size": 4, "epochs_per_shard": 1},
        "student": {"model": "resnet18", "accumulation_steps": 2, "eval_every": 1},
        "execution": {"device": device},
    }


def pipeline_on_device(work: Path, device: str, sizes: Sizes) -> dict:
    """The whole pipeline on ``device`` through ``fadrm run CONFIG --executor local``; then
    the same command again must find everything up to date and rewrite nothing."""
    import torch
    import yaml

    from fadrm.cli import main
    from fadrm.models import create_model, save_weights

    data = make_image_folder(work / "images", sizes.pipeline_classes, sizes.pipeline_per_class,
                             224, seed=1)
    torch.manual_seed(0)
    weights = work / "timm-teacher.pt"
    save_weights(create_model(TIMM_TEACHER, sizes.pipeline_classes, 3, 224), str(weights))
    cfg = gpu_pipeline_config(work / "out", data, weights, device)
    path = work / "gpu-check.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = ["run", str(path), "--executor", "local", "--no-progress"]

    def fadrm_run() -> int:
        err = io.StringIO()  # the CLI's one-line error (and, with -v, its traceback)
        with contextlib.redirect_stderr(err):
            code = main(["-v", *command])
        if err.getvalue().strip():
            log.debug("fadrm run stderr:\n%s", err.getvalue())
        if code != 0:
            lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")]
            raise AssertionError(f"fadrm {' '.join(command)} exited with {code}: "
                                 f"{lines[-1] if lines else 'see the log'}")
        return code

    start = time.perf_counter()
    fadrm_run()
    seconds = time.perf_counter() - start
    run_dir = report_dir(cfg)
    for name in ("metrics.json", "manifest.json", "grid.png"):
        if not (run_dir / name).is_file():
            raise AssertionError(f"the pipeline wrote no {run_dir / name}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("teacher_top1", "student_top1", "student_top5"):
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise AssertionError(f"metrics {key} = {value!r}")
    expected = sizes.pipeline_classes * cfg["ipc"]
    if metrics.get("num_images") != expected:
        raise AssertionError(f"{metrics.get('num_images')} distilled images, expected "
                             f"{expected}")
    manifest = run_dir / "manifest.json"
    stages = {s["stage"] for s in json.loads(manifest.read_text())["shards"]}
    if not {"squeeze", "select", "recover", "relabel", "evaluate"} <= stages:
        raise AssertionError(f"manifest has shards of {sorted(stages)} only")

    written = manifest.stat().st_mtime_ns
    fadrm_run()
    if manifest.stat().st_mtime_ns != written:
        raise AssertionError("re-running the unchanged config rewrote the report")
    return {"seconds": round(seconds, 1), "stage_seconds": metrics.get("stage_seconds"),
            "teachers": [t["model"] for t in cfg["teachers"]], "method": cfg["recover"]["method"],
            "teacher_top1": metrics["teacher_top1"], "student_top1": metrics["student_top1"],
            "num_images": metrics["num_images"], "run_dir": str(run_dir)}
