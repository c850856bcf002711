"""Projection: wall-clock of ImageNet-1K IPC50 FADRM+ end to end on 8, 64 and 256 GPUs, for
three ways of running its last job (the student):

    python -m benchmarks.projection                    # writes benchmarks/results/projection.json
    python -m benchmarks.projection --gpu-check OUT/gpu_check.json

* ``paper_step``: the paper's protocol. One optimiser step per stored batch of
  ``relabel.batch_size``, split into ``student.accumulation_steps`` micro-batches that at most
  that many GPUs share (the projection takes the sharing, 1 up to that, that is fastest);
  the steps are sequential.
* ``data_parallel``: ``student.batches_per_step: K`` with ``execution.train_workers: K``.
  A step takes K stored batches, one per rank, then one gradient all-reduce, so an epoch
  is ``ceil(stored batches / K)`` steps. K is the largest power of two within both the
  GPUs and ``max_global_batch / relabel.batch_size`` (an assumption: the global batch the
  learning-rate rule with warm-up is trusted to).
* ``matrix_3x3_alone`` and ``matrix_3x3_data_parallel``: ResNet-18, ResNet-50 and
  MobileNetV2 students x 3 seeds, 9 units, as the executor runs them. ``alone``
  (``train_workers: 1``): each unit is the paper's step on one GPU, pulled by a free
  worker, so up to G units run side by side (a free GPU takes the next, longest first).
  ``data_parallel`` (``train_workers: K``): the units one after another, each on K ranks.

No GPU is needed: this is arithmetic over the preset's work units (read from the preset, so
a preset change changes the projection) and per-unit costs. Each cost in the JSON's
``figures`` has its value and its source. A source is measured on a GPU (``--gpu-check``),
measured on this CPU as a ratio (``student_scaling.json``), derived, or assumed (then it
is in ``assumptions``):

* Recover: the gpu check's seconds per image when ``--gpu-check`` is given (required
  there), else the paper's 1.09 s per image (FADRM+, one RTX 4090). Its FLOPs per image (4
  teachers round-robin, input-gradient backward ~ 2x forward, 2,000 iterations) give the
  *effective* throughput that any unmeasured cost is charged at, by its FLOPs.
* Select: m x c crops per class through the observer (ResNet-18), plus decoding m JPEGs per
  class at ``decode_ms`` per image on ``cpus_per_gpu`` cores.
* Relabel: the gpu check's relabel images/s (one view of an image through the preset's
  first teacher) scaled by FLOPs to all the relabel teachers, else the effective throughput.
* Student: the gpu check's ms per step (the preset's student, stored batch and
  accumulation on one GPU) scaled by FLOPs to other students, else the effective
  throughput plus ``student_step_overhead_ms``. Validation every ``eval_every`` epochs on
  the 50,000 ImageNet validation images, sharded over the ranks, at the effective throughput.
* The parallel efficiency of the student's compute on several ranks: the speedup at 2
  workers over 1, halved (at most 1), measured on CPU by ``benchmarks.student_scaling``
  (``dp_speedup_2_workers``: the data-parallel variant; ``speedup_2_workers``: the paper's
  step with its micro-batches shared) when its JSON has it, else assumed; taken to hold at
  every rank count. The all-reduce is assumed: a ring of fp32 gradients,
  ``2 (W - 1) / W x bytes / allreduce_gb_per_s + allreduce_latency_ms``, on top of the
  efficiency (whose CPU measurement already pays a gloo all-reduce: conservative).
* A stage's units run in rounds of G (``ceil(units / G)``). The run pays
  ``worker_group_starts`` worker-group starts of ``stage_start_s`` (one group runs every
  stage, the default) and one GPU scale-up from zero (``scale_up_s``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common

NAME = "projection"
TARGET = {"variant": "data_parallel", "gpus": 64, "hours": 1.0}
GPU_COUNTS = (8, 64, 256)
CLASSES = 1000
IPC = 50
VAL_IMAGES = 50_000  # the ImageNet-1K validation set
STUDENT_SCALING = common.RESULTS / "student_scaling.json"
DP_SPEEDUP_KEY = "dp_speedup_2_workers"
PAPER_SPEEDUP_KEY = "speedup_2_workers"

# Forward GFLOPs per 224-px image and parameters in millions (torchvision's published figures).
GFLOPS = {"resnet18": 1.81, "resnet50": 4.09, "densenet121": 2.83,
          "shufflenet_v2_x1_0": 0.14, "mobilenet_v2": 0.30}
PARAMS_M = {"resnet18": 11.69, "resnet50": 25.56, "mobilenet_v2": 3.50}
MATRIX_MODELS = ("resnet18", "resnet50", "mobilenet_v2")
MATRIX_SEEDS = 3
ASSUMPTIONS = {
    "paper_recover_s_per_image": {"fadrm": 0.47, "fadrm+": 1.09},
    "paper_gpu": "RTX 4090",
    "input_backward_factor": 2.0,
    "training_backward_factor": 3.0,
    "decode_ms": 6.0,
    "cpus_per_gpu": 4,
    "stage_start_s": 30.0,
    "worker_group_starts": 1,
    "scale_up_s": 300.0,
    "student_step_overhead_ms": 2.0,
    # Ring all-reduce of fp32 gradients over 100 Gb/s between nodes (NVLink inside a node
    # is faster: conservative for the 2- and 8-GPU groups).
    "allreduce_gb_per_s": 12.5,
    "allreduce_latency_ms": 0.5,
    "gradient_bytes_per_param": 4,
    # The data-parallel student's largest global batch (K x stored batch): large-batch
    # ImageNet training with a scaled lr and warm-up holds to 8k (Goyal et al. 2017); half
    # of that, since the student's accuracy at K > 4 is not measured here.
    "max_global_batch": 4096,
    # Used only where student_scaling.json lacks the measured ratio.
    DP_SPEEDUP_KEY: 1.6,
    PAPER_SPEEDUP_KEY: 2.0,
}


def preset_work(name: str = "imagenet1k-fadrm-plus") -> dict:
    """Units and per-unit sizes of every stage, from the preset (IPC set to 50)."""
    from fadrm.config import load_config

    cfg = load_config(name, ["ipc=50", "output=/tmp/projection", "data.root=/tmp/none"])
    r, rl, st = cfg.recover, cfg.relabel, cfg.student
    block = r.class_block_size or CLASSES
    return {
        "teachers": [t.model.split(":")[-1] for t in cfg.teachers],
        "recover_units": math.ceil(CLASSES / block) * cfg.ipc,
        "images_per_recover_unit": block,
        "iterations": r.total_iterations,
        "select_units": math.ceil(CLASSES / block),
        "classes_per_select_unit": block,
        "candidates": cfg.select.num_candidates, "crops": cfg.select.num_crops,
        "relabel_units": math.ceil(rl.epochs / rl.epochs_per_shard),
        "epochs": rl.epochs, "stored_batch": rl.batch_size,
        "accumulation_steps": st.accumulation_steps, "eval_every": st.eval_every,
        "student": st.models[0].split(":")[-1],
    }


# --------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class Costs:
    """What one unit of work costs on one GPU, and how well the student spreads."""

    recover_s_per_image: float
    effective: float
    """FLOP/s a GPU sustains in recover: what unmeasured work is charged at."""
    relabel_s_per_view: float
    """One image-view through every relabel teacher."""
    student_batch_s: dict[str, float]
    """Compute of one stored batch (forward and backward of every micro-batch), by model."""
    step_overhead_s: float
    paper_efficiency: float
    dp_efficiency: float


def _figure(report: dict, figure: str, part: str, key: str) -> float | None:
    """``figures[figure]`` of a gpu_check report, else ``parts[part].result[key]``."""
    value = (report.get("figures") or {}).get(figure)
    if not value:
        value = (((report.get("parts") or {}).get(part) or {}).get("result") or {}).get(key)
    return float(value) if value else None


def _part_result(report: dict, part: str) -> dict:
    return (((report.get("parts") or {}).get(part) or {}).get("result")) or {}


def measured_recover_s(report: dict, path: Path | str = "gpu_check.json") -> float:
    """Recover seconds per image from a gpu_check report (``figures.recover_s_per_image``,
    else the ``speed.recover`` part's result). A report without it is an error, not a
    silent fall-back to the paper's figure."""
    value = _figure(report, "recover_s_per_image", "speed.recover", "seconds_per_image")
    if not value:
        raise SystemExit(f"{path}: no recover seconds per image (figures.recover_s_per_image "
                         "or parts['speed.recover'].result.seconds_per_image); did the "
                         "recover speed part of the GPU check run?")
    return value


def scaling_efficiency(scaling: dict | None, key: str, a: dict,
                       path: Path | str) -> tuple[float, str]:
    """(speedup at 2 workers) / 2, capped at 1, from student_scaling.json, or the assumed
    speedup where the file or the key is missing; with where it came from."""
    value = (scaling or {}).get(key)
    if value is None:
        why = "no such file" if scaling is None else f"no {key} in it"
        return min(1.0, a[key] / 2), f"assumed: {key} = {a[key]} ({path}: {why})"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise SystemExit(f"{path}: {key} must be a positive number, got {value!r}")
    return min(1.0, value / 2), f"measured on CPU: {key} = {value} in {path}"


def build_costs(work: dict, a: dict, gpu: dict | None, gpu_path: Path | None,
                scaling: dict | None, scaling_path: Path) -> tuple[Costs, dict]:
    """The per-unit costs, and ``figures``: each cost with its value and source."""
    figures = {}
    # A rehearsal (gpu_check --rehearse) ran the GPU half on a CPU: its figures say so.
    measured = "measured in a CPU rehearsal" if (gpu or {}).get("rehearsal") else "measured on GPU"
    if gpu is None:
        recover_s = a["paper_recover_s_per_image"]["fadrm+"]
        src = f"assumed: the paper's FADRM+ figure ({a['paper_gpu']})"
    else:
        recover_s = measured_recover_s(gpu, gpu_path)
        src = f"{measured}: {gpu_path} figures.recover_s_per_image"
    figures["recover_s_per_image"] = {"value": recover_s, "source": src}
    mean_teacher = sum(GFLOPS[t] for t in work["teachers"]) / len(work["teachers"])
    recover_flops = mean_teacher * 1e9 * (1 + a["input_backward_factor"]) * work["iterations"]
    effective = recover_flops / recover_s
    figures["effective_tflops"] = {"value": round(effective / 1e12, 3), "source": (
        "derived: recover FLOPs per image / recover seconds per image")}

    gpu = gpu or {}
    all_teachers = sum(GFLOPS[t] for t in work["teachers"])
    views_per_s = _figure(gpu, "relabel_images_per_s", "speed.relabel", "images_per_s")
    if views_per_s:
        teacher = (_part_result(gpu, "speed.relabel").get("teacher")
                   or work["teachers"][0]).split(":")[-1]
        relabel_s = all_teachers / GFLOPS[teacher] / views_per_s
        src = (f"{measured}: {gpu_path} figures.relabel_images_per_s = "
               f"{views_per_s:.1f} ({teacher}), scaled by FLOPs to {len(work['teachers'])} "
               "teachers")
    else:
        relabel_s = all_teachers * 1e9 / effective
        src = "derived: the relabel teachers' FLOPs at the effective throughput"
    figures["relabel_s_per_view"] = {"value": relabel_s, "source": src}

    models = sorted({work["student"], *MATRIX_MODELS})
    ms = _figure(gpu, "student_ms_per_step", "speed.student", "ms_per_step")
    if ms:
        base = (_part_result(gpu, "speed.student").get("model")
                or work["student"]).split(":")[-1]
        batch_s = {m: ms / 1000 * GFLOPS[m] / GFLOPS[base] for m in models}
        overhead = 0.0  # in the measured step
        src = (f"{measured}: {gpu_path} figures.student_ms_per_step = {ms:.2f} ({base}), "
               "scaled by FLOPs to the other students; per-step overhead included")
    else:
        batch_s = {m: work["stored_batch"] * GFLOPS[m] * 1e9 * a["training_backward_factor"]
                   / effective for m in models}
        overhead = a["student_step_overhead_ms"] / 1000
        src = ("derived: the student's training FLOPs at the effective throughput, plus the "
               "assumed student_step_overhead_ms")
    figures["student_stored_batch_ms"] = {
        "value": {m: round(s * 1000, 3) for m, s in batch_s.items()}, "source": src}

    paper_eff, src = scaling_efficiency(scaling, PAPER_SPEEDUP_KEY, a, scaling_path)
    figures["paper_step_efficiency"] = {"value": paper_eff, "source": src}
    dp_eff, src = scaling_efficiency(scaling, DP_SPEEDUP_KEY, a, scaling_path)
    figures["dp_efficiency"] = {"value": dp_eff, "source": src}
    figures["allreduce_ms"] = {
        "value": {m: {str(w): round(allreduce_s(m, w, a) * 1000, 2) for w in (2, *GPU_COUNTS)}
                  for m in models},
        "source": "assumed: ring all-reduce of fp32 gradients (allreduce_gb_per_s, "
                  "allreduce_latency_ms)"}
    return Costs(recover_s, effective, relabel_s, batch_s, overhead, paper_eff, dp_eff), figures


# --------------------------------------------------------------------------- stages


def distill_seconds(work: dict, gpus: int, c: Costs, a: dict) -> dict:
    """Seconds of select, recover and relabel on ``gpus`` GPUs (units in rounds of G)."""
    def rounds(units: int) -> int:
        return math.ceil(units / gpus)

    recover = rounds(work["recover_units"]) * c.recover_s_per_image \
        * work["images_per_recover_unit"]
    crops = work["classes_per_select_unit"] * work["candidates"] * work["crops"]
    decode = (work["classes_per_select_unit"] * work["candidates"] * a["decode_ms"] / 1000
              / a["cpus_per_gpu"])
    select = rounds(work["select_units"]) * (crops * GFLOPS["resnet18"] * 1e9 / c.effective
                                             + decode)
    views = work["epochs"] * CLASSES * IPC / work["relabel_units"]
    relabel = rounds(work["relabel_units"]) * views * c.relabel_s_per_view
    return {"select": select, "recover": recover, "relabel": relabel}


def allreduce_s(model: str, ranks: int, a: dict) -> float:
    """One gradient all-reduce over ``ranks`` (0 on one rank)."""
    if ranks == 1:
        return 0.0
    grad_bytes = PARAMS_M[model] * 1e6 * a["gradient_bytes_per_param"]
    return (2 * (ranks - 1) / ranks * grad_bytes / (a["allreduce_gb_per_s"] * 1e9)
            + a["allreduce_latency_ms"] / 1000)


def student_run(work: dict, model: str, c: Costs, a: dict, ranks: int, k: int = 1) -> dict:
    """One student training on ``ranks`` GPUs: the paper's step (``k`` = 1; the ranks share
    its micro-batches) or the data-parallel step of ``k`` stored batches (k / ranks each)."""
    batches = math.ceil(CLASSES * IPC / work["stored_batch"])
    if k == 1:
        if ranks > work["accumulation_steps"]:
            raise ValueError(f"the paper's step has {work['accumulation_steps']} micro-batches "
                             f"to share, not {ranks}")
        steps = work["epochs"] * batches
        eff = c.paper_efficiency if ranks > 1 else 1.0
        compute = c.student_batch_s[model] / ranks / eff
    else:
        if k % ranks:
            raise ValueError(f"batches_per_step {k} is not a multiple of {ranks} ranks")
        steps = work["epochs"] * math.ceil(batches / k)
        eff = c.dp_efficiency if ranks > 1 else 1.0
        compute = c.student_batch_s[model] * (k // ranks) / eff
    step = compute + c.step_overhead_s + allreduce_s(model, ranks, a)
    evals = math.ceil(work["epochs"] / work["eval_every"]) if work["eval_every"] else 1
    validation = evals * VAL_IMAGES * GFLOPS[model] * 1e9 / c.effective / ranks
    return {"model": model, "ranks": ranks, "batches_per_step": k,
            "global_batch": k * work["stored_batch"], "steps": steps,
            "ms_per_step": round(step * 1000, 3), "validation_s": round(validation, 1),
            "seconds": round(steps * step + validation, 1)}


def dp_batches_per_step(work: dict, gpus: int, a: dict) -> int:
    """K for the data-parallel student: the largest power of two within the GPUs and
    ``max_global_batch / stored batch``."""
    cap = min(gpus, a["max_global_batch"] // work["stored_batch"])
    return 2 ** int(math.log2(max(cap, 1)))


def paper_step(work: dict, model: str, gpus: int, c: Costs, a: dict) -> dict:
    """The paper's step on the number of sharing GPUs (1 up to the micro-batches) that is
    fastest: with a low measured efficiency one GPU beats two."""
    options = [student_run(work, model, c, a, r)
               for r in range(1, min(gpus, work["accumulation_steps"]) + 1)]
    return min(options, key=lambda run: run["seconds"])


def matrix_alone(work: dict, gpus: int, c: Costs, a: dict) -> dict:
    """The 3 x 3 matrix with ``train_workers: 1``: each unit the paper's step on one GPU;
    a free GPU takes the next unit, the longest first."""
    unit_seconds = {m: student_run(work, m, c, a, 1)["seconds"] for m in MATRIX_MODELS}
    units = sorted((s for s in unit_seconds.values() for _ in range(MATRIX_SEEDS)),
                   reverse=True)
    free = [0.0] * min(gpus, len(units))  # when each GPU is next free
    for seconds in units:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return {"units": len(units), "gpus_per_unit": 1, "units_side_by_side": len(free),
            "unit_seconds": unit_seconds, "seconds": round(max(free), 1)}


def matrix_data_parallel(work: dict, gpus: int, c: Costs, a: dict) -> dict:
    """The 3 x 3 matrix with ``train_workers: K``: units one after another, each the
    data-parallel student on K ranks."""
    k = dp_batches_per_step(work, gpus, a)
    runs = {m: student_run(work, m, c, a, k, k) for m in MATRIX_MODELS}
    return {"units": len(MATRIX_MODELS) * MATRIX_SEEDS, "gpus_per_unit": k,
            "units_side_by_side": 1, "batches_per_step": k,
            "unit_seconds": {m: r["seconds"] for m, r in runs.items()},
            "seconds": round(MATRIX_SEEDS * sum(r["seconds"] for r in runs.values()), 1)}


def project(work: dict, gpus: int, c: Costs, a: dict) -> dict:
    """Every variant's stage seconds and hours on ``gpus`` GPUs."""
    distill = distill_seconds(work, gpus, c, a)
    start = a["worker_group_starts"] * a["stage_start_s"] + a["scale_up_s"]
    k = dp_batches_per_step(work, gpus, a)
    students = {
        "paper_step": paper_step(work, work["student"], gpus, c, a),
        "data_parallel": student_run(work, work["student"], c, a, k, k),
        "matrix_3x3_alone": matrix_alone(work, gpus, c, a),
        "matrix_3x3_data_parallel": matrix_data_parallel(work, gpus, c, a),
    }
    base = sum(distill.values()) + start
    variants = {}
    for name, student in students.items():
        seconds = {**distill, "evaluate (student)": student["seconds"], "start-up": start}
        variants[name] = {"seconds": {s: round(v, 1) for s, v in seconds.items()},
                          "hours": round((base + student["seconds"]) / 3600, 2),
                          "dominant": max(seconds, key=seconds.get), "student": student}
    # The distilled set itself (images and soft labels), without evaluating a student.
    return {"distill_only_hours": round(base / 3600, 2), "variants": variants}


# --------------------------------------------------------------------------- main


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when inside it: the JSON names no checkout."""
    try:
        return path.resolve().relative_to(common.REPO)
    except ValueError:
        return path


def _read(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{path}: cannot read the {what}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.projection")
    parser.add_argument("--gpu-check", type=Path, help="gpu_check JSON with measured costs")
    parser.add_argument("--student-scaling", type=Path, default=STUDENT_SCALING,
                        help="student_scaling JSON (CPU parallel efficiency; used if present)")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    a = dict(ASSUMPTIONS)
    gpu = _read(args.gpu_check, "gpu check report") if args.gpu_check else None
    scaling = (_read(args.student_scaling, "student scaling results")
               if args.student_scaling.exists() else None)
    work = preset_work()
    costs, figures = build_costs(work, a, gpu, args.gpu_check and _shown(args.gpu_check),
                                 scaling, _shown(args.student_scaling))
    by_gpus = {g: project(work, g, costs, a) for g in GPU_COUNTS}
    hours = {name: {str(g): by_gpus[g]["variants"][name]["hours"] for g in GPU_COUNTS}
             for name in by_gpus[GPU_COUNTS[0]]["variants"]}
    result = {
        "preset": "imagenet1k-fadrm-plus", "ipc": IPC, "work": work, "figures": figures,
        "assumptions": a, "by_gpus": by_gpus, "in1k_ipc50_fadrm_plus_hours": hours,
        "distill_only_hours": {str(g): v["distill_only_hours"] for g, v in by_gpus.items()},
        "target": TARGET,
        "met": hours[TARGET["variant"]][str(TARGET["gpus"])] <= TARGET["hours"],
    }
    path = common.write_json(NAME, result, args.out)
    for name, row in hours.items():
        print(f"{name:26s}" + "".join(f"{g:>5s} GPUs {h:6.2f} h" for g, h in row.items()))
    for name, fig in figures.items():
        print(f"  {name}: {fig['source']}")
    print(f"target: {TARGET['variant']} <= {TARGET['hours']} h on {TARGET['gpus']} GPUs: "
          f"{'met' if result['met'] else 'not met'}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
