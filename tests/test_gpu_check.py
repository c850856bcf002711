"""`python -m benchmarks.gpu_check` where there is no CUDA: the CPU half, one JSON, exit 0.

The script runs as on a stock GPU image without Ray: ray, boto3, botocore, kubernetes and moto
are made unimportable before it starts (and its own Ray-free child blocks them again).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu.common import BLOCKED_MODULES
from benchmarks.gpu.compare import params_of, state_of
from benchmarks.gpu.environment import arch_support
from benchmarks.gpu.report import SCHEMA, student_batch_words
from benchmarks.gpu_check import SUMMARY_PREFIX

REPO = Path(__file__).resolve().parent.parent
BLOCKED_RUN = (
    "import runpy, sys\n"
    f"for name in {BLOCKED_MODULES!r}:\n"
    "    sys.modules[name] = None\n"
    "sys.argv = ['benchmarks.gpu_check', *sys.argv[1:]]\n"
    "runpy.run_module('benchmarks.gpu_check', run_name='__main__')\n"
)


def run_gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cpu_half_passes_without_cuda_and_without_ray(tmp_path):
    out = tmp_path / "gpu-check-out"
    proc = run_gpu_check("--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CUDA not available on this machine" in proc.stdout

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["schema"] == SCHEMA
    assert report["cuda_available"] is False and report["device"] is None
    assert report["ok"] is True and report["exit_code"] == 0 and report["failures"] == []
    parts = report["parts"]
    ray_free = parts["cpu.ray_free_run"]
    assert ray_free["status"] == "passed", ray_free["error"]
    assert ray_free["result"]["exit_code"] == 0 and ray_free["result"]["failed_imports"] == {}
    assert "fadrm.plan" in ray_free["result"]["modules"]
    assert parts["check.cuda_device_without_gpu_fails"]["status"] == "passed"
    skipped = {n for n, p in parts.items() if p["status"] == "skipped"}
    assert {"check.recover_step_matches_cpu", "check.nccl_ddp", "pipeline.local_executor",
            "speed.recover"} <= skipped
    assert all(parts[n]["reason"].startswith("no CUDA GPU") for n in skipped)
    assert (out / "gpu_check.log").read_text().count("cpu.ray_free_run") >= 1
    # The results reach stdout too: the last line is the summary as one line of JSON.
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(SUMMARY_PREFIX)
    summary = json.loads(last[len(SUMMARY_PREFIX):])
    assert summary["ok"] is True and summary["exit_code"] == 0
    assert summary["parts"] == {n: p["status"] for n, p in parts.items()}
    assert summary["figures"] == report["figures"]


def test_watchdog_leaves_a_valid_report_and_fails(tmp_path):
    out = tmp_path / "gpu-check-out"
    proc = run_gpu_check("--out", str(out), "--max-seconds", "0.5", timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] is False and "timed out" in report["message"]


@pytest.mark.parametrize("capability, arch_list, supported", [
    ((9, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], True),  # H100/H200
    ((8, 9), ["sm_75", "sm_80", "sm_86", "sm_90"], True),  # RTX 4090 runs sm_86 kernels
    ((12, 1), ["sm_80", "sm_90", "sm_120"], True),  # same major, newer minor
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # V100
    ((10, 3), ["sm_90", "sm_100a"], False),  # arch-specific kernels run on exactly 10.0
    ((10, 0), ["sm_90a", "compute_90"], True),  # PTX, compiled at start-up
    ((8, 0), ["sm_90", "compute_90"], False),  # PTX only runs on newer GPUs
])
def test_arch_support(capability, arch_list, supported):
    ok, reason = arch_support(capability, arch_list)
    assert ok is supported, reason
    if not ok:
        assert f"sm_{capability[0]}{capability[1]}" in reason and arch_list[0] in reason


def test_student_batch_reads_as_micro_batches_not_a_product():
    words = student_batch_words({"batch": 16, "accumulation_steps": 2})
    assert words == "stored batch 16 as 2 micro-batches of 8"
    assert "x" not in words
    assert student_batch_words({"batch": 10, "accumulation_steps": 1}) == (
        "stored batch 10 in one micro-batch")
    assert student_batch_words({"batch": 10, "accumulation_steps": 3}) == (
        "stored batch 10 as 3 micro-batches of 4 or fewer")


def test_weights_moved_counts_parameters_not_bn_buffers():
    # A train-mode forward without any optimiser step: the BN buffers move, the parameters
    # do not, so the fp16 "weights moved" checks must look at the parameters only.
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    before_params, before_state = params_of(net), state_of(net)
    net.train()(torch.randn(2, 3, 8, 8))
    assert all(torch.equal(before_params[k], v) for k, v in params_of(net).items())
    assert not all(torch.equal(before_state[k], v) for k, v in state_of(net).items())
    assert set(params_of(net)) == {n for n, _ in net.named_parameters()}


def test_figures_carry_the_fp16_and_grouped_variants(tmp_path):
    from benchmarks.gpu.report import Report, figures, summary_table

    report = Report(tmp_path, [])

    def part(result: dict) -> dict:
        return {"status": "passed", "seconds": 1.0, "error": None, "result": result}

    report.parts["speed.recover"] = part({
        "seconds_per_image": 0.05, "precision": "bf16",
        "fp16_scaler": {"seconds_per_image": 0.07},
        "ipc_per_forward_2": {"seconds_per_image": 0.04}})
    report.parts["speed.relabel"] = part({
        "images_per_s": 5e4, "fp16_scaler": {"images_per_s": 4e4},
        "batches_per_forward_8": {"images_per_s": 9e4}})
    report.parts["speed.student"] = part({
        "images_per_s": 8e3, "ms_per_step": 2.0, "batch": 16, "accumulation_steps": 2,
        "fp16_scaler": {"ms_per_step": 2.5}})
    report.data["device"] = "cuda:0"
    f = report.data["figures"] = figures(report)
    assert (f["recover_s_per_image"], f["recover_s_per_image_fp16_scaler"],
            f["recover_s_per_image_ipc_per_forward_2"]) == (0.05, 0.07, 0.04)
    assert (f["relabel_images_per_s_fp16_scaler"],
            f["relabel_images_per_s_batches_per_forward_8"]) == (4e4, 9e4)
    assert (f["student_ms_per_step"], f["student_ms_per_step_fp16_scaler"]) == (2.0, 2.5)
    assert f["precision"] == "bf16"
    table = summary_table(report)
    assert "with fp16 + GradScaler" in table and "stored batch 16 as 2 micro-batches" in table


@pytest.mark.parametrize("method, teachers", [("fadrm", 1), ("fadrm+", 2)])
def test_old_recover_loop_gives_todays_bytes_on_the_cpu_with_a_host_read_per_step(
        method, teachers):
    # The speed part's "before" (benchmarks/gpu/legacy.py) must be the same optimisation as
    # today's loop, only run the old way: on the CPU (bf16, no scaler, torch's single-tensor
    # Adam) the same images bit for bit, and the old Adam's step read every iteration.
    import torch

    from benchmarks.gpu.legacy import legacy_recover
    from benchmarks.host_syncs import OpCounter
    from fadrm.config import RecoverConfig
    from fadrm.models import create_model
    from fadrm.synthesis import recover

    torch.manual_seed(0)
    nets = [create_model("convnet", 10, in_chans=1, image_size=28) for _ in range(teachers)]
    cfg = RecoverConfig(method=method, resolutions=[28, 24], stage_iterations=[6, 4],
                        lr=0.05, jitter=4, crop_scale=[0.5, 1.0])
    init = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels, cpu = torch.arange(10), torch.device("cpu")
    today = recover(init, labels, nets, cfg, [0.3], [0.35], 28, seed=4, device=cpu)
    old = OpCounter()
    with old:
        images = legacy_recover(init, labels, nets, cfg, [0.3], [0.35], 28, seed=4, device=cpu)
    assert torch.equal(images, today.images)
    assert not torch.equal(images, init)
    # torch.optim.Adam reads its step count once per iteration; the finiteness check once.
    assert old.ops["aten._local_scalar_dense"] == 10 + 1
