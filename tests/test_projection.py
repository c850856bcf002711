"""Issue 24, item 3: the ImageNet-1K IPC50 FADRM+ projection (``benchmarks/projection.py``)
for the paper's student, the data-parallel student and a 3 x 3 evaluation matrix: K stored
batches a step, the measured CPU efficiency, and the gpu check's figures where given."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import projection as P


def _run(folder: Path, *args: str, scaling: dict | None = None) -> dict:
    """``python -m benchmarks.projection`` into ``folder``; ``scaling`` is the
    student_scaling.json it reads (None: no such file)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "student_scaling.json"
    if scaling is not None:
        path.write_text(json.dumps(scaling))
    assert P.main(["--student-scaling", str(path), "--out", str(folder / "out"), *args]) == 0
    return json.loads((folder / "out" / "projection.json").read_text())


def _student(result: dict, gpus: int, variant: str) -> dict:
    return result["by_gpus"][str(gpus)]["variants"][variant]["student"]


def test_the_data_parallel_student_takes_k_stored_batches_a_step(tmp_path):
    result = _run(tmp_path, scaling={"dp_speedup_2_workers": 1.8, "speedup_2_workers": 1.2})
    work = result["work"]
    batches = math.ceil(50_000 / work["stored_batch"])
    for gpus in (8, 64, 256):
        dp = _student(result, gpus, "data_parallel")
        k = min(gpus, P.ASSUMPTIONS["max_global_batch"] // work["stored_batch"])
        assert dp["batches_per_step"] == dp["ranks"] == k
        assert dp["global_batch"] == k * work["stored_batch"]
        assert dp["steps"] == work["epochs"] * math.ceil(batches / k)
        assert _student(result, gpus, "paper_step")["steps"] == work["epochs"] * batches
    hours = result["in1k_ipc50_fadrm_plus_hours"]["data_parallel"]
    assert hours["8"] > hours["64"] > hours["256"]
    assert result["met"] == (hours["64"] <= 1.0)
    assert result["target"] == {"variant": "data_parallel", "gpus": 64, "hours": 1.0}


def test_the_measured_dp_speedup_sets_the_students_efficiency(tmp_path):
    ideal = _run(tmp_path / "ideal", scaling={"dp_speedup_2_workers": 2.0})
    half = _run(tmp_path / "half", scaling={"dp_speedup_2_workers": 1.0})
    for result, eff in ((ideal, 1.0), (half, 0.5)):
        figure = result["figures"]["dp_efficiency"]
        assert figure["value"] == eff
        assert figure["source"].startswith("measured on CPU: dp_speedup_2_workers")
    # Half the efficiency: each step pays one stored batch's compute twice.
    batch_ms = ideal["figures"]["student_stored_batch_ms"]["value"]["resnet18"]
    step = {name: _student(r, 64, "data_parallel")["ms_per_step"]
            for name, r in (("ideal", ideal), ("half", half))}
    assert step["half"] - step["ideal"] == pytest.approx(batch_ms, abs=2e-3)
    assert (half["in1k_ipc50_fadrm_plus_hours"]["data_parallel"]["64"]
            > ideal["in1k_ipc50_fadrm_plus_hours"]["data_parallel"]["64"])
    # No measured ratio: the assumed one, and the JSON says so.
    assumed = _run(tmp_path / "assumed", scaling={"speedup_2_workers": 1.25})
    figure = assumed["figures"]["dp_efficiency"]
    assert figure["value"] == P.ASSUMPTIONS["dp_speedup_2_workers"] / 2
    assert figure["source"].startswith("assumed: dp_speedup_2_workers")
    assert assumed["figures"]["paper_step_efficiency"] == {
        "value": 0.625, "source": assumed["figures"]["paper_step_efficiency"]["source"]}
    assert assumed["figures"]["paper_step_efficiency"]["source"].startswith("measured on CPU")
    with pytest.raises(SystemExit, match="dp_speedup_2_workers must be a positive number"):
        _run(tmp_path / "bad", scaling={"dp_speedup_2_workers": "fast"})


def test_the_matrix_runs_units_side_by_side_or_one_after_another(tmp_path):
    result = _run(tmp_path, scaling={"dp_speedup_2_workers": 1.8, "speedup_2_workers": 1.2})
    for gpus in (8, 64):
        alone = _student(result, gpus, "matrix_3x3_alone")
        units = alone["unit_seconds"]
        assert set(units) == {"resnet18", "resnet50", "mobilenet_v2"}
        assert alone["units"] == 9 and alone["units_side_by_side"] == min(gpus, 9)
        assert alone["seconds"] >= max(units.values())
        dp = _student(result, gpus, "matrix_3x3_data_parallel")
        assert dp["seconds"] == pytest.approx(3 * sum(dp["unit_seconds"].values()), abs=0.2)
    # 9 units on 8 GPUs: the ninth (the cheapest) waits for the first free GPU.
    eight = _student(result, 8, "matrix_3x3_alone")["unit_seconds"]
    assert _student(result, 8, "matrix_3x3_alone")["seconds"] == pytest.approx(
        max(eight["resnet50"], 2 * eight["mobilenet_v2"]), abs=0.2)
    assert _student(result, 64, "matrix_3x3_alone")["seconds"] == max(
        _student(result, 64, "matrix_3x3_alone")["unit_seconds"].values())


def test_gpu_check_figures_replace_the_derived_costs(tmp_path):
    report = {"figures": {"recover_s_per_image": 0.5, "relabel_images_per_s": 1000.0,
                          "student_ms_per_step": 10.0}}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    result = _run(tmp_path, "--gpu-check", str(path), scaling={"speedup_2_workers": 1.0})
    figures = result["figures"]
    for name in ("recover_s_per_image", "relabel_s_per_view", "student_stored_batch_ms"):
        assert figures[name]["source"].startswith("measured on GPU"), name
    assert figures["recover_s_per_image"]["value"] == 0.5
    teachers = result["work"]["teachers"]
    assert figures["relabel_s_per_view"]["value"] == pytest.approx(
        sum(P.GFLOPS[t] for t in teachers) / P.GFLOPS[teachers[0]] / 1000.0)
    batch_ms = figures["student_stored_batch_ms"]["value"]
    assert batch_ms["resnet18"] == 10.0
    assert batch_ms["resnet50"] == pytest.approx(10.0 * 4.09 / 1.81, abs=1e-3)
    # Splitting the step at half efficiency loses: one GPU, the measured step as it is.
    paper = _student(result, 64, "paper_step")
    assert paper["ranks"] == 1 and paper["ms_per_step"] == pytest.approx(10.0)
    # Relabel: 100 units in 2 rounds on 64 GPUs, each 3 epochs of 50,000 views.
    relabel = result["by_gpus"]["64"]["variants"]["paper_step"]["seconds"]["relabel"]
    assert relabel == pytest.approx(2 * 3 * 50_000 * figures["relabel_s_per_view"]["value"],
                                    abs=0.1)


def test_gpu_check_parts_name_the_measured_teacher_and_absent_figures_are_derived(tmp_path):
    report = {"figures": {}, "parts": {
        "speed.recover": {"result": {"seconds_per_image": 0.5}},
        "speed.relabel": {"result": {"images_per_s": 500.0,
                                     "teacher": "torchvision:densenet121"}}}}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    result = _run(tmp_path, "--gpu-check", str(path))
    figures = result["figures"]
    assert figures["relabel_s_per_view"]["value"] == pytest.approx(
        sum(P.GFLOPS[t] for t in result["work"]["teachers"]) / P.GFLOPS["densenet121"] / 500.0)
    assert figures["student_stored_batch_ms"]["source"].startswith("derived")
    # A rehearsal's figures come from a CPU, and the JSON says so.
    path.write_text(json.dumps({**report, "rehearsal": True}))
    rehearsed = _run(tmp_path / "rehearsal", "--gpu-check", str(path))["figures"]
    assert rehearsed["recover_s_per_image"]["source"].startswith("measured in a CPU rehearsal")


def test_gpu_check_without_the_recover_figure_fails(tmp_path):
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps({"figures": {"relabel_images_per_s": 1000.0,
                                            "student_ms_per_step": 10.0}}))
    with pytest.raises(SystemExit, match="no recover seconds per image"):
        P.main(["--gpu-check", str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "projection.json").exists()
    assert P.measured_recover_s({"figures": {"recover_s_per_image": 0.05}}) == 0.05
    part = {"parts": {"speed.recover": {"result": {"seconds_per_image": 0.07}}}}
    assert P.measured_recover_s(part) == 0.07
    # The key the projection once read: not silently taken.
    with pytest.raises(SystemExit, match="no recover seconds per image"):
        P.measured_recover_s({"recover": {"seconds_per_image": 0.1}, "figures": {}})
