import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # Two-core machines: keep each test process to one intra-op thread.
    torch.set_num_threads(1)


@pytest.fixture
def fmnist_root() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST missing: run `make data` (Debian package dataset-fashion-mnist)")
    return FASHION_MNIST


def tiny_run_config(output: Path, root: Path, **overrides) -> dict:
    """A Fashion-MNIST slice small enough for a test: minutes at most, well above chance."""
    cfg = {
        "name": "tiny",
        "output": str(output),
        "seed": 0,
        "ipc": 2,
        "data": {"kind": "idx", "root": str(root), "resolution": 28, "channels": 1,
                 "mean": [0.286], "std": [0.353], "max_train_per_class": 300, "max_val": 1000},
        "teachers": [{"model": "convnet"}],
        "squeeze": {"epochs": 2, "batch_size": 64, "lr": 0.05},
        "select": {"num_candidates": 20, "num_crops": 2, "crop_scale": [0.5, 1.0]},
        "recover": {"method": "fadrm", "resolutions": [28, 24, 28],
                    "stage_iterations": [4, 4, 4], "lr": 0.05},
        "relabel": {"epochs": 30, "batch_size": 10, "epochs_per_shard": 15},
        "student": {"model": "convnet", "accumulation_steps": 1, "eval_every": 10},
        "execution": {"min_workers": 1, "max_workers": 2, "device": "cpu"},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return cfg


@pytest.fixture
def worker_groups(monkeypatch) -> list[str]:
    """The run names of the Ray Train worker groups (``TorchTrainer``s) that the executor
    creates during the test, in order."""
    import ray_jobs.executor as ex

    names: list[str] = []

    class CountingTrainer(ex.TorchTrainer):
        def __init__(self, *args, **kwargs):
            names.append(kwargs["run_config"].name)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ex, "TorchTrainer", CountingTrainer)
    return names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on 127.0.0.1 (moto's server mode), with a bucket."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3
        from botocore.exceptions import EndpointConnectionError

        client = boto3.client("s3", endpoint_url=endpoint)
        deadline = time.monotonic() + 30
        while True:  # wait until the server accepts connections (bounded)
            try:
                client.create_bucket(Bucket="fadrm-test")
                break
            except EndpointConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
