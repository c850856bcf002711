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
from fadrm.plan import RunPlan


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


def _fake_hub_file(cache: Path, repo: str, content: bytes) -> Path:
    """A Hugging Face Hub cache entry as huggingface_hub lays it out (refs -> snapshot)."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text("0" * 40)
    snapshot = base / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "model.safetensors").write_bytes(content)
    return snapshot / "model.safetensors"


def test_changed_pretrained_file_makes_its_stages_stale(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    weights = _fake_hub_file(tmp_path / "hub", "timm/resnet18.a1_in1k", b"release 1")
    cfg = load_config(_config(tmp_path, {"model": "timm:resnet18", "pretrained": True}))
    before = RunPlan(cfg)
    assert before._teacher_fp[0].endswith(hashlib.sha256(b"release 1").hexdigest())
    weights.write_bytes(b"release 2, same name")
    after = RunPlan(cfg)
    for stage in ("select", "recover", "relabel", "evaluate"):
        assert getattr(after, stage).key.key != getattr(before, stage).key.key, stage


def test_torchvision_file_must_match_the_hash_its_name_pins(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not resnet18's weights")
    cfg = _config(tmp_path, {"model": "torchvision:resnet18", "pretrained": True})
    assert main(["status", str(cfg)]) == 2
    assert "does not start with f37072fd" in capsys.readouterr().err


def test_legacy_densenet_checkpoint_loads(tmp_path):
    import re

    from fadrm.models import load_weights

    model = create_model("torchvision:densenet121", 10, image_size=64)
    state = model.state_dict()
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)\.", r"\1.\2.", k): v
              for k, v in state.items()}
    assert legacy.keys() != state.keys()  # the old torchvision names ("norm.1", ...)
    torch.save(legacy, tmp_path / "legacy.pt")
    fresh = create_model("torchvision:densenet121", 10, image_size=64)
    load_weights(fresh, str(tmp_path / "legacy.pt"))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
