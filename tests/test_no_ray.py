"""The library without Ray, boto3 or kubernetes: every module imports and a whole run works.

In a child process where ``import ray`` (and boto3, botocore, kubernetes, moto) raises
ImportError: every ``fadrm`` module is imported (pkgutil walk), then a tiny config runs
through ``fadrm.cli.main(["run", CONFIG, "--executor", "local", "--no-progress"])``.
"""

import json
import pkgutil

import yaml

import fadrm
from benchmarks.gpu.common import BLOCKED_MODULES, make_image_folder, report_dir, tiny_cpu_config
from benchmarks.gpu.cpu_half import ray_free_run


def test_every_module_imports_and_a_local_run_completes_without_ray(tmp_path):
    cfg = tiny_cpu_config(tmp_path / "out", make_image_folder(tmp_path / "images", 4, 6, 32))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))

    result = ray_free_run(path, timeout=300)  # raises with the child's output on failure

    assert set(BLOCKED_MODULES) >= {"ray", "boto3", "botocore", "kubernetes", "moto"}
    assert result["blocked_ok"]  # the child really could not import them
    assert result["failed_imports"] == {}
    expected = sorted(m.name for m in pkgutil.walk_packages(fadrm.__path__, "fadrm."))
    assert sorted(result["modules"]) == expected
    assert result["exit_code"] == 0

    run_dir = report_dir(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 4  # 4 classes x IPC 1
    assert 0 <= metrics["student_top1"] <= 100
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"squeeze", "select", "recover", "relabel", "evaluate"} <= {
        s["stage"] for s in manifest["shards"]}
