"""`ray job submit` of the Ray entrypoint onto a real `ray start --head` (token auth on)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_run_config
from tests.ray_head import private_ray_head

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline(tmp_path, fmnist_root):
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = tiny_run_config(tmp_path / "out", fmnist_root)
    cfg["name"] = "submitted"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    ray_bin = Path(sys.executable).with_name("ray")
    with private_ray_head(num_cpus=3, object_store_mb=200) as head:
        runtime_env = {"excludes": [".venv", ".git", "runs", "benchmarks/results"]}
        proc = subprocess.run(
            [str(ray_bin), "job", "submit", "--address", head.address,
             "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
             "--", sys.executable, "-m", "ray_jobs.distill", "--config", str(config_path)],
            env=head.client_env(), capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        client = JobSubmissionClient(head.address,
                                     headers={"Authorization": f"Bearer {head.token}"})
        jobs = client.list_jobs()
        assert len(jobs) == 1 and jobs[0].status == JobStatus.SUCCEEDED
        assert "student top-1" in client.get_job_logs(jobs[0].submission_id)
    run_dir = tmp_path / "out" / "runs" / "submitted"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert metrics["num_images"] == 20 and metrics["student_top1"] > 30
    assert {s["stage"] for s in manifest["shards"]} == {"squeeze", "select", "recover",
                                                        "relabel", "evaluate"}
