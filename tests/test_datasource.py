"""Stages decode only what they use (issue: ImageNet-scale data access).

Decodes are counted at the one place pixels come from (``fadrm.data.decode._open``), on small
synthetic ImageFolder trees written here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fadrm.data import decode as fdecode
from fadrm.config import load_config
from fadrm.datasource import DataSource, list_data
from fadrm.models import create_model
from fadrm.executors import LocalExecutor
from fadrm.plan import RunPlan
from fadrm.stages import WorkerContext
from fadrm.runner import run_pipeline


def _tree(root: Path, num_classes: int, per_class: int, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        folder = root / f"c{c:04d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    seen: list[str] = []
    original = fdecode._open

    def counting(file, mode, at_least):
        seen.append(file.rel)
        return original(file, mode, at_least)

    monkeypatch.setattr(fdecode, "_open", counting)
    return seen


def _weights(tmp_path: Path, num_classes: int, resolution: int) -> str:
    model = create_model("convnet", num_classes, in_chans=3, image_size=resolution)
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_select_decodes_only_its_candidates(tmp_path, decodes):
    root = _tree(tmp_path / "train", num_classes=1000, per_class=3, size=8)
    cfg = load_config({
        "name": "big", "output": str(tmp_path / "out"), "ipc": 1,
        "data": {"kind": "imagefolder", "root": str(root), "resolution": 8},
        "teachers": [{"model": "convnet", "weights": _weights(tmp_path, 1000, 8)}],
        "select": {"num_candidates": 2, "num_crops": 2},
        "recover": {"class_block_size": 10},
        "student": {"model": "convnet"},
    })
    plan = RunPlan(cfg)
    assert plan.num_blocks == 100 and not decodes  # planning lists, never decodes
    stage = plan.select
    state = stage.setup(WorkerContext())
    stage.run_unit(state, "b007", WorkerContext())
    # Block 7 holds classes 70..79: two candidates each, nothing else.
    assert len(decodes) == 20
    assert {rel.split("/")[0] for rel in decodes} == {f"c{c:04d}" for c in range(70, 80)}


def test_pipeline_stages_decode_only_what_they_use(tmp_path, decodes):
    root = _tree(tmp_path / "train", num_classes=4, per_class=8)
    cfg = load_config({
        "name": "small", "output": str(tmp_path / "out"), "ipc": 2,
        "data": {"kind": "imagefolder", "root": str(root), "resolution": 12,
                 "val_per_class": 2},
        "teachers": [{"model": "convnet", "weights": _weights(tmp_path, 4, 12)}],
        "select": {"num_candidates": 3, "num_crops": 2},
        "recover": {"resolutions": [12], "stage_iterations": [2]},
        "relabel": {"epochs": 2, "batch_size": 4, "epochs_per_shard": 1},
        "student": {"model": "convnet", "accumulation_steps": 1},
        "execution": {"device": "cpu"},
    })
    listing = list_data(cfg.data)
    val = {f.rel for f in listing.files["val"]}
    per_stage: dict[str, list[str]] = {}

    class Counting(LocalExecutor):
        def run_stage(self, stage, pending, progress):
            start = len(decodes)
            super().run_stage(stage, pending, progress)
            per_stage[stage.name] = decodes[start:]

    run_pipeline(cfg, Counting("cpu"), show_progress=False)
    assert len(per_stage["select"]) == 4 * 3  # m = 3 candidates per class
    assert per_stage["recover"] == [] and per_stage["relabel"] == []
    assert sorted(per_stage["evaluate"]) == sorted(val)  # never a training image
    # The listing reached the run as an index shard, which a worker reads instead.
    index = list((tmp_path / "out" / "index").glob("*.arrow"))
    assert len(index) == 1
    shipped = DataSource(cfg.data, index_uri=str(index[0]))
    assert shipped.listing.files == listing.files and shipped.fingerprint == listing.fingerprint


def test_data_source_pickles_without_listing_or_pixels(tmp_path):
    import pickle

    root = _tree(tmp_path / "train", num_classes=3, per_class=4)
    cfg = load_config({"name": "p", "output": str(tmp_path / "out"), "ipc": 1,
                       "data": {"kind": "imagefolder", "root": str(root), "resolution": 12},
                       "teachers": ["convnet"], "student": {"model": "convnet"}})
    source = DataSource(cfg.data)
    uri = source.write_index(str(tmp_path / "out"))
    blob = pickle.dumps(source)
    assert b"c0002/3.png" not in blob  # the listing stays in the index shard
    again = pickle.loads(blob)
    assert again.index_uri == uri and again.classes == ["c0000", "c0001", "c0002"]
    assert again.class_images(1, [3, 0], 2).shape == (2, 3, 12, 12)


def test_squeeze_streams_a_large_training_set_with_the_same_result(tmp_path):
    """A training set above data.cache_gib is streamed through DataLoader workers; the
    teacher trained on the stream equals the one trained on the decoded set."""
    from fadrm.stages import SqueezeStage
    from fadrm.squeeze import train_teacher
    from fadrm.datasource import StreamedSplit

    root = _tree(tmp_path / "train", num_classes=3, per_class=10)
    settings = {"name": "s", "output": str(tmp_path / "out"), "ipc": 1,
                "data": {"kind": "imagefolder", "root": str(root), "resolution": 12,
                         "val_per_class": 2},
                "teachers": ["convnet"], "student": {"model": "convnet"},
                "squeeze": {"epochs": 2, "batch_size": 8, "lr": 0.05}}
    small = RunPlan(load_config(settings))
    held = small.squeeze[0].setup(WorkerContext())
    big = RunPlan(load_config({**settings, "data": {**settings["data"], "cache_gib": 0}}))
    streamed = big.squeeze[0].setup(WorkerContext())
    assert isinstance(big.squeeze[0], SqueezeStage)
    assert isinstance(streamed[0], StreamedSplit) and not isinstance(held[0], StreamedSplit)
    weights = []
    for train, val in (held, streamed):
        torch.manual_seed(0)
        model = create_model("convnet", 3, in_chans=3, image_size=12)
        train_teacher(model, train, val, big.cfg.squeeze, big.cfg.data, torch.device("cpu"),
                      seed=5)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
