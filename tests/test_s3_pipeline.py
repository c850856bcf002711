"""The whole pipeline through Ray with output root and teacher weights on S3 (moto server)."""

import json

import pytest
import torch

from fadrm import storage
from fadrm.config import load_config
from fadrm.formats import shards
from fadrm.models import create_model, save_weights
from fadrm.plan import RunPlan
from tests.conftest import tiny_run_config


@pytest.mark.slow
def test_pipeline_on_s3(s3_endpoint, fmnist_root):
    import ray

    from ray_jobs.distill import run

    torch.manual_seed(0)
    weights = "s3://fadrm-test/teachers/convnet.pt"
    sha = save_weights(create_model("convnet", 10, in_chans=1, image_size=28), weights)
    settings = tiny_run_config("s3://fadrm-test/runs", fmnist_root,
                               teachers=[{"model": "convnet", "weights": weights}])
    settings["relabel"].update(epochs=4, epochs_per_shard=2)
    cfg = load_config(settings)
    assert cfg.output == "s3://fadrm-test/runs"  # not turned into a local path
    try:
        metrics = run(cfg, show_progress=False)
    finally:
        ray.shutdown()
    # This config's report (runs/<name>/<config fingerprint>) and, object storage having
    # no symlinks, a copy of it as runs/<name>/latest.
    run_dir = RunPlan(cfg).run_dir
    assert run_dir.startswith("s3://fadrm-test/runs/runs/tiny/")
    for name in ("manifest.json", "metrics.json", "grid.png"):
        assert storage.read_bytes(f"s3://fadrm-test/runs/runs/tiny/latest/{name}") == \
            storage.read_bytes(f"{run_dir}/{name}")
    manifest = json.loads(storage.read_bytes(f"{run_dir}/manifest.json"))
    assert json.loads(storage.read_bytes(f"{run_dir}/metrics.json")) == metrics
    assert storage.read_bytes(f"{run_dir}/grid.png")[:4] == b"\x89PNG"
    assert manifest["teachers"][0]["fingerprint"] == f"sha256:{sha}"
    for shard in manifest["shards"]:
        assert shard["uri"].startswith("s3://fadrm-test/runs/")
        assert shards.check(shard["uri"]) is None
    assert {s["stage"] for s in manifest["shards"]} == {"select", "recover", "relabel",
                                                        "evaluate"}
    assert RunPlan(cfg).status().up_to_date
