"""Projection: wall-clock of ImageNet-1K IPC50 FADRM+ end to end on 8, 64 and 256 GPUs.

    python -m benchmarks.projection            # writes benchmarks/results/projection.json

No GPU is needed: this is arithmetic over the ``imagenet1k-fadrm-plus`` preset's work units
(read from the preset itself, so a preset change changes the projection) and per-unit costs.
Nothing here is measured on a GPU unless ``--gpu-check JSON`` gives one (the output of
``python -m benchmarks.gpu_check``, whose recover seconds per image then replace the paper's).

Assumptions (each is a field of ``assumptions`` in the JSON, and in benchmarks/README.md):

* Recover costs the paper's 1.09 s per image for FADRM+ on one RTX 4090 (0.47 for FADRM).
  Its FLOPs per image (4 teachers round-robin, input-gradient backward ~ 2x forward, 2,000
  iterations) give the *effective* GPU throughput that the other stages are charged at: a
  conservative figure, since relabel and the student run large, plain batches.
* Relabel: every image-view is one forward of each relabel teacher (all four); select: m x c
  crops per class through the observer (ResNet-18), plus decoding m JPEGs per class at
  ``decode_ms`` per image on the unit's ``cpus_per_gpu`` cores.
* The student is data-parallel over the micro-batches of each stored batch: at most
  ``accumulation_steps`` GPUs share a step, and its ``epochs x images / batch`` optimiser
  steps are sequential, each paying a gradient all-reduce (``allreduce_ms``).
* A stage's units run in rounds of ``G`` (``ceil(units / G)``). The run pays
  ``worker_group_starts`` worker-group starts of ``stage_start_s`` each (1: one group runs
  every stage, ``execution.worker_group: shared``, the default; 4 with ``per_stage``), and
  one GPU scale-up from zero (``scale_up_s``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks import common

NAME = "projection"
TARGET_HOURS_AT_64 = 1.0
GPU_COUNTS = (8, 64, 256)
CLASSES = 1000
IPC = 50
TRAIN_IMAGES = 1_281_167

# Forward GFLOPs per 224-px image (torchvision's published figures).
GFLOPS = {"resnet18": 1.81, "densenet121": 2.83, "shufflenet_v2_x1_0": 0.14,
          "mobilenet_v2": 0.30}
ASSUMPTIONS = {
    "paper_recover_s_per_image": {"fadrm": 0.47, "fadrm+": 1.09},
    "paper_gpu": "RTX 4090",
    "input_backward_factor": 2.0,
    "training_backward_factor": 3.0,
    "decode_ms": 6.0,
    "cpus_per_gpu": 4,
    "allreduce_ms": 3.0,
    "stage_start_s": 30.0,
    "worker_group_starts": 1,
    "scale_up_s": 300.0,
    "student_step_overhead_ms": 2.0,
}


def preset_work(name: str = "imagenet1k-fadrm-plus") -> dict:
    """Units and per-unit sizes of every stage, from the preset (IPC set to 50)."""
    from fadrm.config import load_config

    cfg = load_config(name, ["ipc=50", "output=/tmp/projection", "data.root=/tmp/none"])
    r, rl, st = cfg.recover, cfg.relabel, cfg.student
    block = r.class_block_size or CLASSES
    teachers = [t.model.split(":")[-1] for t in cfg.teachers]
    return {
        "teachers": teachers,
        "recover_units": math.ceil(CLASSES / block) * cfg.ipc,
        "images_per_recover_unit": block,
        "iterations": r.total_iterations,
        "select_units": math.ceil(CLASSES / block),
        "classes_per_select_unit": block,
        "candidates": cfg.select.num_candidates, "crops": cfg.select.num_crops,
        "relabel_units": math.ceil(rl.epochs / rl.epochs_per_shard),
        "epochs": rl.epochs, "stored_batch": rl.batch_size,
        "accumulation_steps": st.accumulation_steps,
        "student": st.model.split(":")[-1],
    }


def stage_hours(work: dict, gpus: int, recover_s_per_image: float, a: dict) -> dict:
    """Seconds of each stage on ``gpus`` GPUs."""
    images = CLASSES * IPC
    mean_teacher = sum(GFLOPS[t] for t in work["teachers"]) / len(work["teachers"])
    recover_flops = mean_teacher * 1e9 * (1 + a["input_backward_factor"]) * work["iterations"]
    effective = recover_flops / recover_s_per_image  # FLOP/s a GPU sustains in recover

    rounds = lambda units: math.ceil(units / gpus)  # noqa: E731
    recover_unit = recover_s_per_image * work["images_per_recover_unit"]
    recover = rounds(work["recover_units"]) * recover_unit

    crops = work["classes_per_select_unit"] * work["candidates"] * work["crops"]
    decode = (work["classes_per_select_unit"] * work["candidates"] * a["decode_ms"] / 1000
              / a["cpus_per_gpu"])
    select_unit = crops * GFLOPS["resnet18"] * 1e9 / effective + decode
    select = rounds(work["select_units"]) * select_unit

    views = work["epochs"] * images / work["relabel_units"]
    relabel_unit = views * sum(GFLOPS[t] for t in work["teachers"]) * 1e9 / effective
    relabel = rounds(work["relabel_units"]) * relabel_unit

    steps = work["epochs"] * math.ceil(images / work["stored_batch"])
    sharing = min(gpus, work["accumulation_steps"])
    per_step_compute = (work["stored_batch"] * GFLOPS[work["student"]] * 1e9
                        * a["training_backward_factor"] / effective / sharing)
    per_step = per_step_compute + (a["allreduce_ms"] if sharing > 1 else 0) / 1000 \
        + a["student_step_overhead_ms"] / 1000
    student = steps * per_step
    starts = a["worker_group_starts"] * a["stage_start_s"] + a["scale_up_s"]
    seconds = {"select": select, "recover": recover, "relabel": relabel,
               "evaluate (student)": student, "start-up": starts}
    return {
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "hours": round(sum(seconds.values()) / 3600, 2),
        # The distilled set itself (images + soft labels), without evaluating a student.
        "distill_only_hours": round((sum(seconds.values()) - student) / 3600, 2),
        "dominant": max(seconds, key=seconds.get),
        "student_steps": steps, "student_gpus_used": sharing,
        "effective_tflops": round(effective / 1e12, 2),
    }


def measured_recover_s(report: dict, path: Path | str = "gpu_check.json") -> float:
    """Recover seconds per image from a gpu_check report (``figures.recover_s_per_image``,
    else the ``speed.recover`` part's result). A report without it is an error, not a
    silent fall-back to the paper's figure."""
    value = (report.get("figures") or {}).get("recover_s_per_image")
    if not value:
        part = (report.get("parts") or {}).get("speed.recover") or {}
        value = (part.get("result") or {}).get("seconds_per_image")
    if not value:
        raise SystemExit(f"{path}: no recover seconds per image (figures.recover_s_per_image "
                         "or parts['speed.recover'].result.seconds_per_image); did the "
                         "recover speed part of the GPU check run?")
    return float(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.projection")
    parser.add_argument("--gpu-check", type=Path, help="gpu_check JSON with measured costs")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    a = dict(ASSUMPTIONS)
    source = "paper (RTX 4090)"
    recover_s = a["paper_recover_s_per_image"]["fadrm+"]
    if args.gpu_check:
        recover_s = measured_recover_s(json.loads(args.gpu_check.read_text()), args.gpu_check)
        source = "measured (gpu_check)"
    work = preset_work()
    by_gpus = {g: stage_hours(work, g, recover_s, a) for g in GPU_COUNTS}
    result = {
        "preset": "imagenet1k-fadrm-plus", "ipc": IPC, "work": work,
        "recover_s_per_image": recover_s, "recover_cost_source": source,
        "assumptions": a, "by_gpus": by_gpus,
        "in1k_ipc50_fadrm_plus_hours": {str(g): v["hours"] for g, v in by_gpus.items()},
        "distill_only_hours": {str(g): v["distill_only_hours"] for g, v in by_gpus.items()},
        "dominant_stage": {str(g): v["dominant"] for g, v in by_gpus.items()},
        "target_hours_at_64": TARGET_HOURS_AT_64,
        "met": by_gpus[64]["hours"] <= TARGET_HOURS_AT_64,
    }
    path = common.write_json(NAME, result, args.out)
    for g, v in by_gpus.items():
        parts = ", ".join(f"{k} {s / 3600:.2f} h" for k, s in v["seconds"].items())
        print(f"{g:4d} GPUs: {v['hours']:.2f} h ({parts}); dominant: {v['dominant']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
