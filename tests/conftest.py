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
