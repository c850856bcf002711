"""The evaluation matrix (issue 24): student models x seeds as units of the evaluate stage,
each a run of its own, resumable, spread over workers, summarised in the report."""

from __future__ import annotations

import hashlib
import json
import statistics

import pytest

from fadrm.config import ConfigError, config_from_dict, load_config
from fadrm.plan import RunPlan
from fadrm.runner import create_executor, print_summary, run_pipeline
from tests.conftest import tiny_run_config

MODELS = ["convnet", "convnet_w128"]


def _cfg(tmp_path, root, **student):
    return config_from_dict(tiny_run_config(tmp_path, root, student={
        "model": "convnet", "accumulation_steps": 1, "eval_every": 10, **student}))


def _run(cfg):
    return run_pipeline(cfg, create_executor(cfg, "local"), show_progress=False)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_model_and_no_seeds_is_todays_one_student(tmp_path, fmnist_root):
    plain = RunPlan(_cfg(tmp_path, fmnist_root))
    assert plain.evaluate.units() == ["student"]
    assert plain.evaluate.unit_uri("student").endswith("/metrics.json")
    matrix = RunPlan(_cfg(tmp_path, fmnist_root, model=MODELS, seeds=[0, 1]))
    assert matrix.evaluate.units() == ["convnet-s0", "convnet-s1", "convnet_w128-s0",
                                       "convnet_w128-s1"]
    # Everything before the student is shared; the student's key differs.
    assert matrix.relabel.key.key == plain.relabel.key.key
    assert matrix.evaluate.key.key != plain.evaluate.key.key


def test_unknown_or_repeated_students_fail_naming_the_entry(tmp_path, fmnist_root):
    with pytest.raises(ConfigError, match=r"^student\.model\[1\]: .*resnet9000"):
        _cfg(tmp_path, fmnist_root, model=["convnet", "resnet9000"])
    with pytest.raises(ConfigError, match=r"^student\.model: lists a model twice"):
        _cfg(tmp_path, fmnist_root, model=["convnet", "convnet"])
    with pytest.raises(ConfigError, match=r"^student\.seeds: "):
        _cfg(tmp_path, fmnist_root, seeds=[])


def test_matrix_report_units_bytes_and_resumption(tmp_path, fmnist_root, monkeypatch,
                                                  capsys):
    import fadrm.student

    cfg = _cfg(tmp_path, fmnist_root, model=MODELS, seeds=[0, 1])
    # A worker lost in the third unit: the run fails, the two finished units are kept.
    real, calls = fadrm.student.train_student, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("worker lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(fadrm.student, "train_student", flaky)
    with pytest.raises(RuntimeError, match="worker lost"):
        _run(cfg)
    plan = RunPlan(cfg)
    assert plan.evaluate.pending() == ["convnet_w128-s0", "convnet_w128-s1"]
    kept = plan.evaluate.unit_uri("convnet-s1")
    kept_bytes = open(kept, "rb").read()
    calls.clear()
    monkeypatch.setattr(fadrm.student, "train_student", real)
    counted = []
    monkeypatch.setattr(fadrm.student, "train_student",
                        lambda *a, **k: counted.append(1) or real(*a, **k))
    metrics = _run(cfg)
    assert len(counted) == 2  # only the lost unit and the one never started
    assert open(kept, "rb").read() == kept_bytes

    units = plan.evaluate.unit_metrics()
    students = metrics["students"]
    assert list(students) == MODELS
    for model in MODELS:
        row = students[model]
        top1 = [units[f"{model}-s{s}"]["student_top1"] for s in (0, 1)]
        assert row["seeds"] == [0, 1] and row["top1"] == top1
        assert row["top1_mean"] == round(statistics.fmean(top1), 2)
        assert row["top1_std"] == round(statistics.stdev(top1), 2)
        assert row["margin_over_random_real"] is None  # no random-real run of this matrix
    # The headline is the first unit, and the teachers are measured once, there.
    assert metrics["student_top1"] == units["convnet-s0"]["student_top1"]
    assert metrics["teacher_top1"] > 50 and units["convnet-s1"]["teachers_top1"] == []
    report = tmp_path / "runs" / cfg.name / "latest"
    assert (report / "students.png").read_bytes()[:4] == b"\x89PNG"
    print_summary(cfg, metrics)
    out = capsys.readouterr().out
    assert f"student convnet_w128 {students['convnet_w128']['top1_mean']:6.2f} +- " in out

    # Each unit's bytes are those of a run with that one student and seed...
    alone = _cfg(tmp_path, fmnist_root, model="convnet_w128", seeds=[1])
    _run(alone)
    ev = RunPlan(alone).evaluate
    assert _sha(tmp_path / ev.weights_uri("convnet_w128-s1")) == \
        _sha(tmp_path / plan.evaluate.weights_uri("convnet_w128-s1"))
    # ...and (convnet, the run's seed) is today's one-student run.
    plain = _cfg(tmp_path, fmnist_root)
    _run(plain)
    assert _sha(tmp_path / RunPlan(plain).evaluate.weights_uri("student")) == \
        _sha(tmp_path / plan.evaluate.weights_uri("convnet-s0"))


def test_margins_over_a_random_real_matrix(tmp_path, fmnist_root):
    student = {"model": MODELS, "seeds": [0]}
    rr = _cfg(tmp_path, fmnist_root, **student)
    rr = load_config({**_dict(rr), "name": "rr", "recover": {"method": "random-real"}})
    rr_metrics = _run(rr)
    metrics = _run(_cfg(tmp_path, fmnist_root, **student))
    for model in MODELS:
        want = metrics["students"][model]["top1_mean"] - rr_metrics["students"][model]["top1_mean"]
        assert metrics["students"][model]["margin_over_random_real"] == pytest.approx(want)


def _dict(cfg):
    from fadrm.config import config_to_dict

    return config_to_dict(cfg)


@pytest.mark.slow
def test_ray_workers_share_the_matrix_units(tmp_path, fmnist_root):
    import ray

    from ray_jobs.distill import run

    cfg = load_config(tiny_run_config(tmp_path, fmnist_root, student={
        "model": MODELS, "seeds": [0, 1], "accumulation_steps": 1, "eval_every": 10}))
    try:
        metrics = run(cfg, show_progress=False)
    finally:
        ray.shutdown()
    units = RunPlan(cfg).evaluate.unit_metrics()
    assert len(units) == 4 and len(metrics["students"]) == 2
    # Two workers (execution.max_workers) trained the four units between them.
    assert len({m["worker"] for m in units.values()}) == 2, [m["worker"] for m in units.values()]
