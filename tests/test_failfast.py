"""Through real Ray: a bad input inside a worker fails its stage once (never retried), two
Ray instances on one machine do not trip over each other, asking for GPUs that cannot
come fails at once, and waiting for workers is visible and bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.ray_head import private_ray_head

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    from fadrm.config import load_config
    from fadrm.data import DataError
    from fadrm.errors import InputError
    from fadrm.plan import RunPlan
    from fadrm.progress import StageProgress
    from fadrm.stages import SelectStage
    from ray_jobs.executor import RayTrainExecutor, ResourceWaitTimeout
    from tests.conftest import tiny_run_config
    import ray

    out, attempts, head = sys.argv[1], sys.argv[2], sys.argv[3]
    result = {}

    class BadInput(SelectStage):
        def setup(self, ctx):
            with open(attempts, "a") as f:
                f.write(f"{os.getpid()}\\n")
            raise DataError("class 'x' (/data/x) is unreadable")

    def config(**execution):
        base = {"min_workers": 1, "max_workers": 1, "max_failures": 3, "device": "cpu"}
        return load_config(tiny_run_config(out, "/usr/share/datasets/fashion-mnist",
                                           execution={**base, **execution}))

    def run(cfg, stage_cls=SelectStage):
        plan = RunPlan(cfg)
        stage = stage_cls(plan, plan.select.key, plan.select.method, plan.select.section)
        start = time.monotonic()
        try:
            RayTrainExecutor(cfg).run_stage(stage, stage.units(), StageProgress("x", 1, False))
            return {"error": None}
        except Exception as exc:
            return {"type": type(exc).__name__, "error": str(exc),
                    "input": isinstance(exc, InputError),
                    "seconds": time.monotonic() - start}

    # 1. Embedded instance, while another Ray instance (the test's head) runs here.
    result["bad_input"] = run(config(), BadInput)
    # 2. GPUs asked of the embedded instance, which has none.
    result["gpu_local"] = run(config(use_gpu=True))
    ray.shutdown()
    # 3. A cluster without GPUs: the stage waits, says so, and gives up when told.
    result["gpu_wait"] = run(config(address=head, use_gpu=True, resource_wait_s=8))
    print("RESULT " + json.dumps(result))
''')


@pytest.mark.slow
def test_bad_input_fails_once_and_waits_are_bounded(tmp_path):
    attempts = tmp_path / "attempts.txt"
    attempts.write_text("")
    with private_ray_head(num_cpus=2) as head:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path / "out"), str(attempts),
             head.gcs_address],
            cwd=REPO, env={**head.client_env(), "PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])

    bad = result["bad_input"]
    assert bad["input"] and bad["error"] == "select: class 'x' (/data/x) is unreadable"
    # One worker group, one attempt: max_failures=3 did not retry a deterministic error.
    assert len(attempts.read_text().split()) == 1
    assert "Found multiple active Ray instances" not in output

    gpu = result["gpu_local"]
    assert gpu["input"] and gpu["error"].startswith("execution.use_gpu: is true")
    assert gpu["seconds"] < 5

    wait = result["gpu_wait"]
    assert wait["type"] == "ResourceWaitTimeout", wait
    assert "execution.resource_wait_s=8" in wait["error"] and wait["seconds"] < 40
    # (On a loaded machine the CPU-only runs above may wait a minute too: their notes name
    # no GPU.)
    notes = [ln for ln in output.splitlines()
             if "waiting" in ln and "for workers" in ln and "GPU" in ln]
    assert notes and "1 GPU" in notes[0] and "0 GPU available" in notes[0], output[-3000:]


@pytest.mark.slow
def test_ctrl_c_stops_a_run_within_seconds(tmp_path, fmnist_root):
    import os
    import signal
    import time

    import yaml

    from tests.conftest import tiny_run_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_config(tmp_path / "out", fmnist_root,
                                                  squeeze__epochs=50)))
    fadrm = Path(sys.executable).with_name("fadrm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([str(fadrm), "run", str(cfg), "--no-progress"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    for line in proc.stdout:  # wait for the first stage to be under way
        seen.append(line)
        if "squeeze[0]: workers started" in line:  # (then the others, same group)
            break
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    rest, _ = proc.communicate(timeout=60)
    # ~3 s on 2 idle or busy cores; the way out is bounded (ray_jobs.teardown: ~7 s even
    # with the raylet and GCS frozen), so 25 s leaves room for a loaded CI machine.
    assert time.monotonic() - start < 25
    assert proc.returncode == 130, "".join(seen) + rest
    assert "interrupted: finished units are kept; run the same command again to resume" in rest
    assert "Traceback" not in rest
