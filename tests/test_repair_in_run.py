"""Issue 27, item 5: a same-size corruption of a finished shard is found by
`fadrm status --verify` (every byte read) and repaired by the run that meets it -- in that
same run, recorded in manifest.json's repaired_outputs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml

from fadrm.cli import main
from fadrm.config import load_config
from fadrm.errors import EXIT_OK, EXIT_WORK_TO_DO
from fadrm.formats import shards
from fadrm.plan import RunPlan
from fadrm.runner import run_pipeline
from tests.conftest import tiny_run_config
from tests.test_pipeline import RecordingExecutor


def test_a_corrupt_shard_error_keeps_its_uri_through_pickling():
    exc = shards.ShardCorruptError("s3://b/recover/k/block0000.arrow: sha256 ...",
                                   "s3://b/recover/k/block0000.arrow")
    back = pickle.loads(pickle.dumps(exc))  # how a Ray worker's error reaches the driver
    assert isinstance(back, shards.ShardCorruptError)
    assert back.uri == exc.uri and str(back) == str(exc)


def _flip_a_byte(uri: str) -> bytes:
    original = Path(uri).read_bytes()
    middle = len(original) // 2
    with open(uri, "r+b") as f:
        f.seek(middle)
        f.write(bytes([original[middle] ^ 0xFF]))
    assert Path(uri).stat().st_size == len(original)  # same size: only reading finds it
    return original


@pytest.fixture
def corrupted_run(tmp_path, fmnist_root):
    settings = tiny_run_config(tmp_path / "out", fmnist_root)
    settings["relabel"].update(epochs=2, epochs_per_shard=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    cfg = load_config(path)
    run_pipeline(cfg, RecordingExecutor(), show_progress=False)
    plan = RunPlan(cfg)
    uri = plan.recover.unit_uri(plan.recover.units()[0])
    return path, cfg, uri, _flip_a_byte(uri)


def test_status_verify_finds_a_same_size_corruption(corrupted_run, capsys):
    path, cfg, uri, _ = corrupted_run
    capsys.readouterr()
    assert main(["status", str(path)]) == EXIT_OK  # sizes only: it cannot see this
    capsys.readouterr()
    assert main(["status", str(path), "--verify"]) == EXIT_WORK_TO_DO
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("recover"))
    assert "damaged" in line and uri in line and "sha256" in line, out
    assert main(["status", str(path), "--verify", "--json"]) == EXIT_WORK_TO_DO
    stages = {s["name"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert stages["recover"]["state"] == "damaged"
    assert stages["select"]["state"] == "done"
    # The config's own execution.verify_outputs asks status to read every byte too.
    assert main(["status", str(path), "--set", "execution.verify_outputs=true"]) \
        == EXIT_WORK_TO_DO
    assert shards.is_complete(uri)  # status only looks: it discards nothing


def test_a_run_that_meets_a_damaged_shard_repairs_it_in_the_same_run(corrupted_run):
    path, _, uri, original = corrupted_run
    # A change downstream: relabel runs again and reads the damaged recover shard.
    changed = load_config(path, ["relabel.epochs=3"])
    rerun = RecordingExecutor()
    metrics = run_pipeline(changed, rerun, show_progress=False)  # does not raise
    assert rerun.ran == ["relabel", "recover", "relabel", "evaluate"]
    assert Path(uri).read_bytes() == original  # regenerated: the same bytes
    plan = RunPlan(changed)
    manifest = json.loads((Path(plan.run_dir) / "manifest.json").read_text())
    repaired = manifest["repaired_outputs"]
    assert [(r["stage"], r["uri"]) for r in repaired] == [("recover", uri)]
    assert "sha256" in repaired[0]["problem"]
    assert plan.status(verify=True).up_to_date
    assert metrics["student_top1"] >= 0


@pytest.mark.slow
def test_a_ray_worker_that_meets_a_damaged_shard_has_it_repaired_in_the_same_run(
        corrupted_run, worker_groups):
    """As above, through Ray Train (embedded local Ray): the worker that reads the damaged
    recover shard records it (no retry: max_failures 0 would fail the run), and the driver
    raises it as ShardCorruptError with its uri, so the run regenerates it."""
    import ray

    from ray_jobs.executor import RayTrainExecutor

    path, _, uri, original = corrupted_run
    changed = load_config(path, ["relabel.epochs=3", "execution.max_workers=1",
                                 "execution.max_failures=0"])
    try:
        metrics = run_pipeline(changed, RayTrainExecutor(changed), show_progress=False)
    finally:
        ray.shutdown()
    # relabel met it (group 1); recover, relabel and evaluate ran again (group 2).
    assert [g.split("-")[1:4] for g in worker_groups] == [["relabel", "to", "evaluate"],
                                                         ["recover", "to", "evaluate"]]
    assert Path(uri).read_bytes() == original
    plan = RunPlan(changed)
    manifest = json.loads((Path(plan.run_dir) / "manifest.json").read_text())
    repaired = manifest["repaired_outputs"]
    assert [(r["stage"], r["uri"]) for r in repaired] == [("recover", uri)]
    assert "sha256" in repaired[0]["problem"] and repaired[0]["problem"].startswith("relabel: ")
    assert plan.status(verify=True).up_to_date
    assert metrics["student_top1"] >= 0
