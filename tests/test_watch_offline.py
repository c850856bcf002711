"""`fadrm watch --dry-run` works offline: no kube-config, no reachable dashboard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import tiny_run_config

REPO = Path(__file__).resolve().parents[1]


def _watch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tmp_path / "out", Path(
        "/usr/share/datasets/fashion-mnist"))))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KUBE"))}
    env.update(HOME=str(tmp_path), KUBECONFIG=str(tmp_path / "no-kube-config"),
               PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "fadrm.cli", "watch", str(config), *args,
                           "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_kubernetes_dry_run_renders_the_rayjob_without_a_cluster(tmp_path, fmnist_root):
    proc = _watch(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rendered = yaml.safe_load(proc.stdout.split("\nsubmit:")[0])
    assert rendered["kind"] == "RayJob" and rendered["metadata"]["name"].startswith("fadrm-tiny-")
    assert "dry run: the cluster is not reachable" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("submit: ")


def test_ray_dry_run_shows_the_submission_without_a_dashboard(tmp_path, fmnist_root):
    proc = _watch(tmp_path, "--target", "ray", "--address", "http://127.0.0.1:9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    preview = yaml.safe_load(proc.stdout.split("\nsubmit:")[0])
    assert preview["entrypoint"] == "python -m ray_jobs.distill --config run.yaml"
    assert preview["metadata"]["fadrm.io/run"] == "tiny"
    assert "dry run: the cluster is not reachable" in proc.stderr
