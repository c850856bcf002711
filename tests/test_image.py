"""The images, built and run (issue 28).

The build helpers and KubeRay's pod commands are checked here in milliseconds on every run.
The builds themselves are marked `image`: a build from nothing takes about 20 minutes on
2 cores (10 of them for the ray image's 5.6 GB of torch/CUDA wheels), too long for
`make test`, so they run only when asked for, `pytest -m image` or `make image-check`, and
are skipped with a reason when no container engine (a docker daemon or podman) is present.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.containers import find_engine, parse_pip_config, stage_pip_config

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- pip staging


def test_host_pip_config_is_staged_below_root_without_host_paths(tmp_path):
    wheels = tmp_path / "wheels"
    index = tmp_path / "mirror" / "simple"
    for d in (wheels, index):
        d.mkdir(parents=True)
    cert = tmp_path / "ca.crt"
    cert.write_text("CERT")
    text = (f"global.cert='{cert}'\n"
            f"global.extra-index-url='file://{index} https://mirror.example/simple'\n"
            f"global.find-links='/does/not/exist'\n"
            f":env:.find-links='{wheels}'\n"
            f":env:.default-timeout='180'\n")
    config = parse_pip_config(text)
    assert config["global"]["find-links"] == str(wheels)  # the environment wins, as in pip
    staged = stage_pip_config(config, tmp_path / "stage")
    conf = (tmp_path / "stage/.config/pip/pip.conf").read_text()
    assert str(tmp_path) not in conf  # only container paths below /root
    assert "https://mirror.example/simple" in conf and "default-timeout = 180" in conf
    assert "cert = /root/.config/pip/files/0-ca.crt" in conf
    assert (tmp_path / "stage/.config/pip/files/0-ca.crt").read_text() == "CERT"
    # A file:// index is mounted from its parent (where its wheel files are).
    mounts = dict(staged.mounts)
    assert mounts[index.parent] + "/simple" in conf and mounts[wheels] in conf
    args = staged.volume_args()
    assert args[:2] == ["-v", f"{tmp_path / 'stage'}:/root:ro"]
    assert all(a.endswith(":ro") for a in args[1::2])
    # Mount points exist in the staged folder, so none is created in an image layer.
    for _, dst in staged.mounts:
        assert (tmp_path / "stage" / dst.removeprefix("/root/")).is_dir()


def test_docker_without_a_daemon_is_not_an_engine(tmp_path, monkeypatch):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\nexit 1\n")  # `docker info` fails: no daemon
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("FADRM_CONTAINER_ENGINE", raising=False)
    assert find_engine() is None
    assert find_engine("docker") is None


# --------------------------------------------------------------------------- KubeRay's pods


@pytest.fixture(scope="module")
def gpu_cluster_spec():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is needed to render k8s/overlays/gpu")
    from benchmarks.container_cluster import cluster_spec

    return cluster_spec()


def test_pods_get_kuberays_commands_and_token_auth(gpu_cluster_spec):
    from benchmarks.container_cluster import HEAD_FQDN, pod

    head = pod(gpu_cluster_spec, "head", "h", "TOKEN")
    assert head["command"] == ["/bin/bash", "-lc", "--"]
    assert head["args"] == [
        "ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start --head --block "
        "--dashboard-agent-listen-port=52365 --dashboard-host=0.0.0.0 --memory=17179869184 "
        "--metrics-export-port=8080 --no-monitor --num-cpus=0 --num-gpus=0"]
    assert head["mounts"] == ["/config"] and head["shm"] == "4Gi"
    worker = pod(gpu_cluster_spec, "worker", "w", "TOKEN")
    assert f"--address={HEAD_FQDN}:6379" in worker["args"][0]
    assert "--num-gpus" not in worker["args"][0]  # CPU only here
    for p in (head, worker):
        assert p["env"]["RAY_AUTH_MODE"] == "token" and p["env"]["RAY_AUTH_TOKEN"] == "TOKEN"
        assert p["env"]["KUBERAY_GEN_RAY_START_CMD"] in p["args"][0]


def test_the_gpu_workers_command_in_production(gpu_cluster_spec):
    from benchmarks.container_cluster import ray_start_command

    group = gpu_cluster_spec["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cmd = ray_start_command("worker", group["rayStartParams"], limits, autoscaling=True)
    assert "--num-cpus=8" in cmd and "--num-gpus=1" in cmd and "--memory=51539607552" in cmd
    assert "--no-monitor" not in cmd and "--block" in cmd


def test_a_cluster_without_token_auth_is_refused(gpu_cluster_spec):
    from benchmarks.containers import CheckError
    from benchmarks.container_cluster import pod

    spec = json.loads(json.dumps(gpu_cluster_spec))
    spec.pop("authOptions")
    with pytest.raises(CheckError, match="without authentication"):
        pod(spec, "head", "h", "TOKEN")


def _output_tree(root: Path, recover: bytes, seconds: float) -> Path:
    """A stage output tree as the pipeline writes it: shards, sidecars, a report, timings."""
    for rel, data in {
            "recover/k1/images-b000-i0000.arrow": recover,
            "recover/k1/images-b000-i0000.arrow.json": b'{"sha256": "x"}',
            "recover/k1/timing.json": json.dumps({"seconds": seconds}).encode(),
            "evaluate/k2/metrics.json": json.dumps(
                {"student_top1": 30.5, "student_train_seconds": seconds}).encode(),
            "evaluate/k2/metrics.sha256.json": json.dumps({"seconds": seconds}).encode(),
            "runs/x/latest/manifest.json": json.dumps({"finished": seconds}).encode()}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_shard_digests_ignore_only_times(tmp_path):
    """Two runs differing only in wall times compare equal; one differing shard does not."""
    from benchmarks.container_cluster import shard_digests

    a = shard_digests(_output_tree(tmp_path / "a", b"pixels", 1.0))
    b = shard_digests(_output_tree(tmp_path / "b", b"pixels", 2.0))
    c = shard_digests(_output_tree(tmp_path / "c", b"pixelz", 1.0))
    assert a == b
    assert set(a) == {"recover/k1/images-b000-i0000.arrow",
                      "recover/k1/images-b000-i0000.arrow.json", "evaluate/k2/metrics.json"}
    assert [k for k in a if a[k] != c[k]] == ["recover/k1/images-b000-i0000.arrow"]
    (tmp_path / "b" / "evaluate/k2/metrics.json").write_text(
        json.dumps({"student_top1": 30.0, "student_train_seconds": 1.0}))
    assert shard_digests(tmp_path / "b") != a


# --------------------------------------------------------------------------- the builds


@pytest.fixture
def engine(request):
    expr = request.config.getoption("markexpr") or ""
    if "image" not in expr or "not image" in expr:
        pytest.skip("builds the images (~20 min from nothing): run with -m image, or "
                    "`make image-check`")
    found = find_engine()
    if found is None:
        pytest.skip("no container engine: neither a docker daemon nor podman")
    return found


@pytest.mark.image
@pytest.mark.timeout(3600)
def test_image_check(engine, tmp_path):
    """Both targets build from the unchanged Dockerfile and work from the inside."""
    out = tmp_path / "image_check.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.image_check",
                           "--engine", engine.name, "check", "--results", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=3500)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    failed = [c for c in result["checks"] if not c["ok"]]
    assert proc.returncode == 0 and result["ok"] and not failed, failed or proc.stderr[-3000:]
    names = {c["name"] for c in result["checks"]}
    assert {"fadrm --help", "pip check",
            "fadrm run --executor local (tiny) to a mounted volume",
            "fadrm watch --dry-run (kubernetes target, no cluster)"} <= names
    for target in ("ray", "watch"):
        assert result["images"][target]["size_bytes"] > 0


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_container_cluster_survives_a_killed_worker(engine, tmp_path):
    """Head + 2 workers from the ray image; a worker killed mid-stage; the same bytes."""
    pytest.importorskip("ray")
    out = tmp_path / "container_cluster.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.container_cluster",
                           "--results", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=3500)
    if proc.returncode == 2 and "missing" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"], result
    assert result["runs"]["worker-killed"]["killed_at"] is not None
    assert result["same_bytes"] and result["shards"] > 0
