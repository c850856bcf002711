"""Teachers from anywhere users keep them: pinned URLs, and pretrained weights whose own
hash (not only their name) is the teacher fingerprint."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fadrm.cli import main
from fadrm.config import ConfigError, load_config
from fadrm.models import create_model
from fadrm.pipeline import RunPlan


@pytest.fixture
def served(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www (stopped after the test)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    return root


def _config(tmp_path: Path, teacher: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "name": "pin", "output": str(tmp_path / "out"), "ipc": 1,
        "data": {"kind": "imagefolder", "root": str(_data(tmp_path / "train")),
                 "resolution": 12, "val_per_class": 1},
        "teachers": [teacher], "student": {"model": "convnet"},
        "select": {"num_candidates": 2},
    }))
    return path


def test_url_weights_are_checked_against_their_pin(tmp_path, served, capsys, monkeypatch):
    monkeypatch.setenv("FADRM_CACHE", str(tmp_path / "cache"))
    www, base = served
    torch.save(create_model("convnet", 2, in_chans=3, image_size=12).state_dict(),
               www / "teacher.pt")
    digest = hashlib.sha256((www / "teacher.pt").read_bytes()).hexdigest()
    url = f"{base}/teacher.pt"

    with pytest.raises(ConfigError, match=r"teachers\[0\]\.sha256: is required"):
        load_config(_config(tmp_path, {"model": "convnet", "weights": url}))

    wrong = _config(tmp_path, {"model": "convnet", "weights": url, "sha256": "0" * 64})
    assert main(["status", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert f"{url} has sha256 {digest[:16]}" in err and "0" * 16 in err
    assert not (tmp_path / "cache" / "weights").exists()  # nothing mismatched is kept

    pinned = _config(tmp_path, {"model": "convnet", "weights": url, "sha256": digest})
    assert main(["status", str(pinned)]) == 1  # checked, fits: work to do
    assert (tmp_path / "cache" / "weights" / f"{digest}.pt").is_file()
    plan = RunPlan(load_config(pinned))
    assert plan._teacher_fp == [f"sha256:{digest}"]  # the pin, without a download
    (www / "teacher.pt").unlink()  # later reads come from this machine's cache
    assert plan.teacher_bytes(0) == (tmp_path / "cache" / "weights" / f"{digest}.pt").read_bytes()


def test_changed_pretrained_file_makes_its_stages_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"release 1")
    cfg = load_config(_config(tmp_path, {"model": "torchvision:resnet18", "pretrained": True}))
    before = RunPlan(cfg)
    assert before._teacher_fp[0].endswith(hashlib.sha256(b"release 1").hexdigest())
    weights.write_bytes(b"release 2, same name")
    after = RunPlan(cfg)
    for stage in ("select", "recover", "relabel", "evaluate"):
        assert getattr(after, stage).key.key != getattr(before, stage).key.key, stage
