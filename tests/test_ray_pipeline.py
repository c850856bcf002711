"""The same pipeline through Ray Train on an embedded local Ray instance (2 workers)."""

import json

import pytest

from fadrm.config import load_config
from tests.conftest import tiny_run_config


@pytest.mark.slow
def test_end_to_end_through_local_ray(tmp_path, fmnist_root, worker_groups):
    import ray

    from ray_jobs.distill import run

    cfg = load_config(tiny_run_config(tmp_path, fmnist_root, ipc=3))
    try:
        metrics = run(cfg, show_progress=False)
    finally:
        ray.shutdown()
    # One worker group ran every stage (execution.worker_group: shared, the default).
    assert len(worker_groups) == 1, worker_groups
    assert worker_groups[0].startswith("fadrm-squeeze-to-evaluate-"), worker_groups
    assert set(metrics["stage_seconds"]) == {"squeeze[0]", "select", "recover", "relabel",
                                             "evaluate"}
    assert all(v > 0 for v in metrics["stage_seconds"].values())
    run_dir = tmp_path / "runs" / cfg.name / "latest"  # -> this config's own report folder
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == metrics
    assert metrics["num_images"] == 30
    assert metrics["student_top1"] > 30 and metrics["teacher_top1"] > 70
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # 3 recover units (1 class block x IPC 3) were spread over the Ray Train workers.
    assert len([s for s in manifest["shards"] if s["stage"] == "recover"]) == 3
    assert (run_dir / "grid.png").stat().st_size > 0


def test_worker_group_setting_decides_how_stages_are_grouped(tmp_path, fmnist_root,
                                                             monkeypatch):
    from fadrm.plan import RunPlan
    from ray_jobs.executor import RayTrainExecutor

    for mode, want in (("shared", [["select", "recover", "relabel"]]),
                       ("per_stage", [["select"], ["recover"], ["relabel"]])):
        cfg = load_config(tiny_run_config(tmp_path, fmnist_root, execution__worker_group=mode))
        plan = RunPlan(cfg)
        executor = RayTrainExecutor(cfg)
        seen = []
        monkeypatch.setattr(executor, "_run_group",
                            lambda work, clock: seen.append([s.name for s, _ in work]))
        work = [(s, s.units()) for s in (plan.select, plan.recover, plan.relabel)]
        executor.run_stages(work, clock=None)
        executor.run_stages([], clock=None)  # nothing to do: no group, Ray not started
        assert seen == want, mode
