"""The whole pipeline in-process (LocalExecutor): outputs, manifest, metrics, re-runs."""

import json

import pytest

from fadrm import shards
from fadrm.config import load_config
from fadrm.pipeline import LocalExecutor, RunPlan, run_pipeline
from tests.conftest import tiny_run_config

REQUIRED_METRICS = {"method", "ipc", "teacher_top1", "student_top1", "student_top1_best",
                    "student_top5", "num_images", "stage_seconds"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tests.conftest import FASHION_MNIST

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(tiny_run_config(out, FASHION_MNIST))
    metrics = run_pipeline(cfg, LocalExecutor("cpu"), show_progress=False)
    return cfg, metrics, out


def test_writes_every_output(finished_run):
    cfg, metrics, out = finished_run
    run_dir = out / "runs" / cfg.name
    for name in ("manifest.json", "metrics.json", "grid.png", "config.yaml"):
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert REQUIRED_METRICS <= set(on_disk)
    assert on_disk["num_images"] == 20 and on_disk["ipc"] == 2 and on_disk["method"] == "fadrm"
    for value in ("teacher_top1", "student_top1", "student_top1_best", "student_top5"):
        assert 0 <= on_disk[value] <= 100
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = {s["stage"] for s in manifest["shards"]}
    assert {"select", "recover", "relabel", "evaluate", "squeeze"} <= stages
    assert len([s for s in manifest["shards"] if s["stage"] == "recover"]) == 2  # 1 block x ipc 2
    assert len([s for s in manifest["shards"] if s["stage"] == "relabel"]) == 2  # 30 epochs / 15
    for shard in manifest["shards"]:
        assert len(shard["sha256"]) == 64
    assert manifest["teachers"][0]["sha256"] and manifest["config"]["ipc"] == 2
    assert "skipped_inputs" in manifest and set(manifest["stage_seconds"]) == set(manifest["stages"])


def test_teacher_and_student_learn(finished_run):
    _, metrics, _ = finished_run
    assert metrics["teacher_top1"] > 70
    assert metrics["student_top1"] > 30  # 10 classes: chance is 10 %


def test_rerun_is_up_to_date_and_changes_invalidate_downstream(finished_run):
    cfg, first, out = finished_run
    plan = RunPlan(cfg)
    assert plan.status().up_to_date
    manifest = out / "runs" / cfg.name / "manifest.json"
    before = manifest.stat().st_mtime_ns

    class NoWork:
        def run_stage(self, stage, pending, progress):
            raise AssertionError(f"{stage.name} ran on an unchanged config: {pending}")

    again = run_pipeline(cfg, NoWork(), show_progress=False)
    assert again == first
    assert manifest.stat().st_mtime_ns == before  # the report is not rewritten either

    changed = load_config(tiny_run_config(out, plan.cfg.data.root,
                                          relabel__epochs=15, relabel__epochs_per_shard=15))
    status = {s.name: s for s in RunPlan(changed).status().stages}
    assert status["squeeze[0]"].state == "done" and status["recover"].state == "done"
    assert status["relabel"].state == "stale" and "relabel.epochs: 30 -> 15" in status["relabel"].reason
    assert status["evaluate"].state == "stale"


def test_corrupt_shard_is_detected(finished_run):
    cfg, _, _ = finished_run
    plan = RunPlan(cfg)
    uri = plan.recover.unit_uri(plan.recover.units()[0])
    original = open(uri, "rb").read()
    try:
        with open(uri, "r+b") as f:
            f.seek(len(original) // 2)
            f.write(bytes([original[len(original) // 2] ^ 0xFF]))
        with pytest.raises(shards.ShardCorruptError, match="sha256"):
            shards.read_table(uri)
    finally:
        open(uri, "wb").write(original)
