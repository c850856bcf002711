"""The whole pipeline in-process (LocalExecutor): outputs, manifest, metrics, re-runs."""

import json
from pathlib import Path

import torch

import pytest

from fadrm.config import load_config
from fadrm.executors import LocalExecutor
from fadrm.plan import RunPlan
from fadrm.formats import shards
from fadrm.runner import run_pipeline
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
    run_dir = Path(RunPlan(cfg).run_dir)  # runs/<name>/<config fingerprint>
    assert (out / "runs" / cfg.name / "latest").resolve() == run_dir.resolve()
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
    manifest = Path(plan.run_dir) / "manifest.json"
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
    assert status["relabel"].state == "stale"
    assert "relabel.epochs 15 here, 30 there" in status["relabel"].reason
    assert status["evaluate"].state == "stale"


def test_corrupt_shard_is_detected(finished_run):
    cfg, _, _ = finished_run
    plan = RunPlan(cfg)
    uri = plan.recover.unit_uri(plan.recover.units()[0])
    original = open(uri, "rb").read()
    sidecar = open(uri + ".json", "rb").read()
    try:
        with open(uri, "r+b") as f:
            f.seek(len(original) // 2)
            f.write(bytes([original[len(original) // 2] ^ 0xFF]))
        # Same size, so only reading finds it: the reader refuses it and discards it,
        # which makes the unit pending for the next run.
        assert shards.check(uri, full=False) is None
        with pytest.raises(shards.ShardCorruptError, match="sha256.*discarded"):
            shards.read_table(uri)
        assert not shards.is_complete(uri)
    finally:
        open(uri, "wb").write(original)
        open(uri + ".json", "wb").write(sidecar)


def test_status_cli_exit_codes(finished_run, tmp_path, capsys):
    import yaml

    from fadrm.cli import main
    from fadrm.config import config_to_dict

    cfg, _, _ = finished_run
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert main(["status", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["status", str(path), "--set", "student.lr=0.002"]) == 1
    out = capsys.readouterr().out
    assert "evaluate" in out and "stale" in out and "student.lr 0.002 here, 0.001 there" in out


class RecordingExecutor(LocalExecutor):
    def __init__(self):
        super().__init__("cpu")
        self.ran: list[str] = []

    def run_stage(self, stage, pending, progress):
        self.ran.append(stage.name)
        super().run_stage(stage, pending, progress)


def test_changing_only_the_relabel_teacher_reruns_relabel_and_evaluate(tmp_path, fmnist_root):
    from fadrm.models import create_model, save_weights

    weights = []
    for i in range(2):
        torch.manual_seed(100 + i)
        model = create_model("convnet", 10, in_chans=1, image_size=28)
        weights.append(str(tmp_path / f"teacher{i}.pt"))
        save_weights(model, weights[-1])
    teachers = [{"model": "convnet", "weights": weights[0], "relabel": False},
                {"model": "convnet", "weights": weights[1], "recover": False}]
    settings = tiny_run_config(tmp_path / "out", fmnist_root, teachers=teachers)
    settings["relabel"].update(epochs=2, epochs_per_shard=1)
    cfg = load_config(settings)
    first = RecordingExecutor()
    run_pipeline(cfg, first, show_progress=False)
    assert first.ran == ["select", "recover", "relabel", "evaluate"]

    # A new checkpoint for the relabel-only teacher: same path, new bytes.
    torch.manual_seed(7)
    save_weights(create_model("convnet", 10, in_chans=1, image_size=28), weights[1])
    status = {s.name: s.state for s in RunPlan(cfg).status().stages}
    assert status == {"select": "done", "recover": "done", "relabel": "stale",
                      "evaluate": "stale"}
    second = RecordingExecutor()
    run_pipeline(cfg, second, show_progress=False)
    assert second.ran == ["relabel", "evaluate"]

    # A new recover teacher invalidates selection (it scores realism) and everything after.
    torch.manual_seed(8)
    save_weights(create_model("convnet", 10, in_chans=1, image_size=28), weights[0])
    third = RecordingExecutor()
    run_pipeline(cfg, third, show_progress=False)
    assert third.ran == ["select", "recover", "relabel", "evaluate"]


def test_damaged_shard_is_regenerated_with_identical_bytes(tmp_path, fmnist_root):
    settings = tiny_run_config(tmp_path / "out", fmnist_root)
    settings["relabel"].update(epochs=2, epochs_per_shard=1)
    cfg = load_config(settings)
    run_pipeline(cfg, LocalExecutor("cpu"), show_progress=False)
    plan = RunPlan(cfg)
    uri = plan.recover.unit_uri(plan.recover.units()[1])
    original = open(uri, "rb").read()
    open(uri, "wb").write(original[:-100])  # truncated
    recover = {s.name: s for s in RunPlan(cfg).status().stages}["recover"]
    assert recover.state == "damaged" and uri in recover.reason  # status sees it, cheaply
    assert not RunPlan(cfg).status().up_to_date
    rerun = RecordingExecutor()
    run_pipeline(cfg, rerun, show_progress=False)
    assert rerun.ran == ["recover"]  # regenerated; nothing downstream changes
    assert open(uri, "rb").read() == original
    manifest = json.loads((Path(plan.run_dir) / "manifest.json").read_text())
    assert [r["uri"] for r in manifest["repaired_outputs"]] == [uri]


def test_hard_label_baseline_runs_without_teacher_logits(tmp_path, fmnist_root):
    from fadrm.models import create_model, save_weights
    from fadrm.formats.labels import is_hard

    torch.manual_seed(100)
    weights = str(tmp_path / "teacher.pt")
    save_weights(create_model("convnet", 10, in_chans=1, image_size=28), weights)
    settings = tiny_run_config(tmp_path / "out", fmnist_root,
                               teachers=[{"model": "convnet", "weights": weights}])
    settings["recover"]["method"] = "random-real"
    settings["relabel"].update(epochs=4, epochs_per_shard=2, label_mode="hard")
    settings["student"]["eval_every"] = 0
    cfg = load_config(settings)
    metrics = run_pipeline(cfg, LocalExecutor("cpu"), show_progress=False)
    plan = RunPlan(cfg)
    table = shards.read_table(plan.relabel.unit_uri(plan.relabel.units()[0]))
    assert is_hard(table) and "logits" not in table.column_names
    assert table.schema.metadata[b"label_mode"] == b"hard"
    assert 0 <= metrics["student_top1"] <= 100
    soft = load_config({**settings, "relabel": {**settings["relabel"], "label_mode": "soft"}})
    assert RunPlan(soft).relabel.key.key != plan.relabel.key.key


def test_report_reads_only_the_images_it_draws(finished_run, monkeypatch):
    from fadrm import report
    from fadrm.datasource import load_distilled

    cfg, metrics, _ = finished_run
    plan = RunPlan(cfg)
    reads: list[str] = []
    original = shards.read_table
    monkeypatch.setattr(shards, "read_table", lambda uri, **kw: reads.append(uri)
                        or original(uri, **kw))
    monkeypatch.setattr(report, "GRID_CLASSES", 3)
    monkeypatch.setattr(report, "GRID_PER_CLASS", 1)
    again = report.write_report(plan, metrics["stage_seconds"])
    recover_reads = [u for u in reads if "/recover/" in u]
    assert recover_reads == [plan.recover.unit_uri("b000-i0000")]  # not IPC index 1
    assert again["num_images"] == 20
    # The grid's subset equals the same rows of the full set (ids ordered class-major).
    full, full_labels = load_distilled(plan)
    part, part_labels = load_distilled(plan, [0, 1, 2], 1)
    assert torch.equal(part, full[[0, 2, 4]]) and part_labels.tolist() == [0, 1, 2]
    assert full_labels.tolist() == [c for c in range(10) for _ in range(2)]
