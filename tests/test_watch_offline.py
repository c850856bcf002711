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


# A child that cannot import Ray, as in the `watch` image (kubernetes, no Ray).
_NO_RAY_TARGETS = '''
import argparse, sys

class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoRay())
from fadrm.errors import InputError, MissingDependencyError
from fadrm.watch import add_watch_arguments, create_target

args = add_watch_arguments(argparse.ArgumentParser()).parse_args(
    ["run.yaml", "--template", "k8s/base/run-template.yaml", "--dry-run"])
k8s = create_target("kubernetes", args)
ray = create_target("ray", args)
try:
    ray.client
except MissingDependencyError as exc:
    missing = str(exc)
try:
    create_target("slurm", args)
except InputError as exc:
    unknown = str(exc)
print(type(k8s).__module__, type(k8s).__name__, type(ray).__name__, k8s.template["kind"],
      "ray" in sys.modules)
print(missing)
print(unknown)
'''


def test_targets_are_entry_points_that_load_without_ray(tmp_path):
    """`fadrm watch` finds both targets through the `fadrm.watch_targets` entry points (the
    library never imports ray_jobs), and neither imports Ray until it is used."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _NO_RAY_TARGETS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found, missing, unknown = proc.stdout.strip().splitlines()
    assert found == "ray_jobs.watch_targets KubernetesTarget RayJobsTarget RayJob False"
    assert "`fadrm watch --target ray` needs the Python package 'ray'" in missing
    assert "unknown watch target 'slurm'" in unknown and "'kubernetes', 'ray'" in unknown
