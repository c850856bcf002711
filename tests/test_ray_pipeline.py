"""The same pipeline through Ray Train on an embedded local Ray instance (2 workers)."""

import json

import pytest

from fadrm.config import load_config
from tests.conftest import tiny_run_config


@pytest.mark.slow
def test_end_to_end_through_local_ray(tmp_path, fmnist_root):
    import ray

    from ray_jobs.distill import run

    cfg = load_config(tiny_run_config(tmp_path, fmnist_root, ipc=3))
    try:
        metrics = run(cfg, show_progress=False)
    finally:
        ray.shutdown()
    run_dir = tmp_path / "runs" / cfg.name / "latest"  # -> this config's own report folder
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == metrics
    assert metrics["num_images"] == 30
    assert metrics["student_top1"] > 30 and metrics["teacher_top1"] > 70
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # 3 recover units (1 class block x IPC 3) were spread over the Ray Train workers.
    assert len([s for s in manifest["shards"] if s["stage"] == "recover"]) == 3
    assert (run_dir / "grid.png").stat().st_size > 0
