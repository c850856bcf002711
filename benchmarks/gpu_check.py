"""Does this GPU node run FADRM correctly, and how fast? One command, a few minutes.

    PYTHONPATH=. python3 -m benchmarks.gpu_check --out gpu-check-out     # or: make gpu-check

Runs from a source checkout on a stock CUDA PyTorch image (torch, torchvision, timm, pyarrow,
pyyaml, numpy, pillow, tqdm, matplotlib): no install of this package, no Ray, boto3 or
pytest, no network, no data (it makes its own images). In order:

1. environment: GPU, driver, torch / CUDA / cuDNN / NCCL versions, compute capability;
   refuses (exit 2) on a GPU that this torch build has no kernels for;
2. CPU half (also on machines without CUDA): every ``fadrm`` module imports and a tiny
   config runs through ``fadrm run --executor local`` on the CPU, in a child process in
   which ray, boto3, botocore, kubernetes and moto cannot be imported;
3. the CUDA checks of :mod:`benchmarks.gpu.cuda_checks` (CUDA against the CPU, fp16 +
   GradScaler, BN hooks, relabel determinism, student and squeeze steps, NCCL + DDP);
4. the whole pipeline (squeeze, select, recover, relabel, evaluate) on CUDA through the
   local executor: FADRM+ with a torchvision teacher (trained by a one-epoch squeeze) and a
   timm teacher (given weights), on a synthetic 224 px ImageFolder;
5. speed at the paper's ImageNet-1K setting (preset ``imagenet1k-fadrm``): recover seconds
   per image extrapolated to the preset's iterations (beside the paper's 0.47 s on one RTX
   4090) with peak GPU memory and the fraction of the measured bf16 ``torch.mm`` peak it
   reaches, and beside it the loop as it was before issue 23; FADRM+ with the
   ``imagenet1k-fadrm-plus`` preset's four teachers (the paper: 1.09 s); relabel and
   student images per second.

Every part is time-boxed and guarded: a failing part records its error and the rest still
run. Results go to ``OUT/gpu_check.json`` (schema in benchmarks/README.md, rewritten after
every part) and ``OUT/gpu_check.log``; the last line on stdout is the summary (figures, each
part's status) as one line of JSON after ``gpu_check summary: ``, so a job whose working
directory is not returned still has the results in its log. Exit code: 0 all passed (or, without CUDA, the CPU
half passed), 1 something failed or timed out, 2 refused (no torch, or an unsupported GPU).

This file is the driver (arguments, order, watchdog, exit code). The parts live in
``benchmarks/gpu/``, one module per group: ``environment`` (1), ``cpu_half`` (2),
``cuda_checks`` with its tolerances in ``compare`` (3), ``pipeline`` (4), ``speed`` (5);
``report`` holds the JSON and the summary table, ``common`` the sizes and synthetic data
they share. A new group is a module there and one ``report.run`` call here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

# Standard library only at import time (this script must start on a bare CUDA image): the
# parts that need torch are imported once torch is known to be there.
from benchmarks.gpu.common import GPU_SIZES, REHEARSAL_SIZES
from benchmarks.gpu.environment import environment, gpu_smoke, missing_modules
from benchmarks.gpu.report import (EXIT_FAILED, EXIT_OK, EXIT_REFUSED, Report, figures,
                                   summary_json, summary_table)

log = logging.getLogger("gpu_check")

SPEED_PARTS = ("speed.matmul_peak", "speed.recover", "speed.recover_plus", "speed.relabel",
               "speed.student")
DEVICE_PARTS = ("pipeline.local_executor", *SPEED_PARTS)
"""The parts after the CUDA checks, in order; all of them need a device."""
SUMMARY_PREFIX = "gpu_check summary: "
"""The last line on stdout: this prefix, then the summary as one line of JSON."""


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out, args.verbose)
    report = Report(out, list(argv if argv is not None else sys.argv[1:]))
    missing = missing_modules(("torch",))
    if missing:
        report.data.update(ok=False, exit_code=EXIT_REFUSED, cuda_available=False,
                           message="torch is not installed: nothing can run")
        report.save()
        _emit(f"gpu_check: REFUSED: {report.data['message']}", out)
        _emit(SUMMARY_PREFIX + json.dumps(summary_json(report), sort_keys=True), out)
        return EXIT_REFUSED
    _start_watchdog(report, args.max_seconds, out)
    try:
        code = _run(report, args)
    except Exception as exc:  # noqa: BLE001 - recorded; the JSON is still written
        log.error("gpu_check itself failed: %s", traceback.format_exc())
        report.parts["gpu_check"] = {"status": "failed", "seconds": None, "result": None,
                                     "error": f"{type(exc).__name__}: {exc}"}
        report.data["message"] = f"FAILED: gpu_check itself: {type(exc).__name__}: {exc}"
        code = EXIT_FAILED
    report.data.update(exit_code=code, ok=code == EXIT_OK)
    report.data["figures"] = figures(report)
    report.save()
    _emit("\n" + summary_table(report), out)
    _emit(f"\ngpu_check: {report.data['message']} (exit {code}; {report.path})", out)
    _emit(SUMMARY_PREFIX + json.dumps(summary_json(report), sort_keys=True), out)
    return code


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Check that this (GPU) node runs FADRM correctly, and how fast.")
    parser.add_argument("--out", default="gpu-check-out",
                        help="folder for gpu_check.json and gpu_check.log (default "
                             "gpu-check-out)")
    parser.add_argument("--max-seconds", type=float, default=480.0,
                        help="hard limit for the whole check; parts still running then are "
                             "recorded as timed out (default 480)")
    parser.add_argument("--no-speed", action="store_true",
                        help="correctness only: skip the speed measurements")
    parser.add_argument("--rehearse", action="store_true",
                        help="run the GPU half on the CPU at toy sizes (for developing this "
                             "script on a machine without a GPU; figures are meaningless)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def _run(report: Report, args) -> int:
    """Every part, the CPU half in a child process beside the device half; the exit code."""
    import torch

    from benchmarks.gpu import cpu_half

    env = _record_environment(report, args)
    work = Path(tempfile.mkdtemp(prefix="fadrm-gpu-check-"))
    report.on_exit.append(lambda: shutil.rmtree(work, ignore_errors=True))
    try:
        try:
            child, cpu_cfg = cpu_half.start_cpu_half(work)
            report.on_exit.append(child.kill)
            child_started = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - recorded as the part's failure
            child = None
            report.parts["cpu.ray_free_run"] = {
                "status": "failed", "seconds": 0.0, "result": None,
                "error": f"could not start: {type(exc).__name__}: {exc}"}

        device, refused = _choose_device(args, report.data["cuda_available"], env)
        report.data["device"] = str(device) if device is not None else None
        if device is not None:
            _device_half(report, device, args, work)
        else:
            reason = (f"GPU not supported: {refused}" if refused else
                      "no CUDA GPU" + ("" if torch.version.cuda else
                                       f" (torch {torch.__version__} is a CPU-only build)"))
            _without_device(report, reason)

        if child is not None:
            report.run("cpu.ray_free_run", lambda: {
                **cpu_half.finish_ray_free_run(child), **cpu_half.check_tiny_outputs(cpu_cfg),
                "child_seconds": round(time.perf_counter() - child_started, 1)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _verdict(report, device, refused, args.rehearse)


def _record_environment(report: Report, args) -> dict:
    """Part 1: the machine, into the report and the log."""
    import torch

    import fadrm
    from benchmarks.gpu.cuda_checks import cuda_available

    report.data["fadrm_version"] = fadrm.__version__
    env = environment()
    report.data["environment"] = env
    cuda = cuda_available()
    report.data["cuda_available"] = cuda
    report.data["rehearsal"] = bool(args.rehearse)
    gpu = env["gpus"][0] if env["gpus"] else None
    log.info("torch %s (CUDA %s, cuDNN %s, NCCL %s), Python %s, %s", torch.__version__,
             env["torch_cuda"], env["cudnn"], env["nccl"], env["python"], env["cpu"])
    if gpu:
        log.info("GPU 0 of %d: %s, compute capability %s, %.0f GiB, driver %s; %s",
                 env["gpu_count"], gpu["name"], gpu["capability"], gpu["memory_gib"],
                 env["driver"], env["support"])
    if env["missing_packages"]:
        log.warning("missing Python packages: %s (the parts that need them will fail)",
                    ", ".join(env["missing_packages"]))
    report.save()
    if not cuda and not args.rehearse:
        log.info("CUDA: not available on this machine (%s): running the CPU parts only",
                 f"torch {torch.__version__} is a CPU-only build" if not torch.version.cuda
                 else "no GPU visible")
    return env


def _choose_device(args, cuda: bool, env: dict):
    """The device of the GPU half (the CPU when rehearsed), or None and why it was refused."""
    import torch

    if args.rehearse:
        return torch.device("cpu"), None
    if not cuda:
        return None, None
    if not env["supported"]:
        return None, env["support"]
    return torch.device("cuda", 0), None


def _device_half(report: Report, device, args, work: Path) -> None:
    """Parts 3 to 5 on ``device``: the CUDA checks, the pipeline, the speed figures."""
    from benchmarks.gpu import cuda_checks, pipeline, speed

    sizes = REHEARSAL_SIZES if args.rehearse else GPU_SIZES
    smoke = report.run("gpu.smoke", gpu_smoke, device)
    if smoke["status"] != "passed":
        for name in [f"check.{c.name}" for c in cuda_checks.CHECKS] + list(DEVICE_PARTS):
            report.skip(name, "the GPU failed its first kernel launch (gpu.smoke)")
        return
    for check in cuda_checks.CHECKS:
        report.run(f"check.{check.name}", run_cuda_check, check, device.type)
    report.run("pipeline.local_executor", pipeline.pipeline_on_device, work / "pipeline",
               device.type, sizes)
    if args.no_speed:
        for name in SPEED_PARTS:
            report.skip(name, "--no-speed")
        return
    mm = report.run("speed.matmul_peak", speed.bench_matmul, device, sizes)
    peak = (mm.get("result") or {}).get("peak_tflops")
    state = speed.SpeedState()
    peak = peak * 1e12 if peak else None
    report.run("speed.recover", speed.bench_recover, device, sizes, state, peak)
    report.run("speed.recover_plus", speed.bench_recover_plus, device, sizes, peak)
    report.run("speed.relabel", speed.bench_relabel, device, sizes, state)
    report.run("speed.student", speed.bench_student, device, sizes, state)


def _without_device(report: Report, reason: str) -> None:
    """No usable GPU: the checks that need none run on the CPU, the rest are skipped."""
    from benchmarks.gpu import cuda_checks

    for check in cuda_checks.CHECKS:
        if check.needs_cuda:
            report.skip(f"check.{check.name}", reason)
        else:
            report.run(f"check.{check.name}", run_cuda_check, check, "cpu")
    for name in DEVICE_PARTS:
        report.skip(name, reason)


def run_cuda_check(check, device: str) -> dict:
    check.run(device) if check.needs_cuda else check.run()
    return {"what": check.summary}


def _verdict(report: Report, device, refused: str | None, rehearse: bool) -> int:
    """The exit code, and the one-line message beside it in the report."""
    failures = report.failures()
    if refused:
        report.data["message"] = f"REFUSED: {refused}; FADRM cannot run on this GPU"
        return EXIT_REFUSED
    if device is None:
        report.data["message"] = ("CUDA not available on this machine: ran the CPU parts only, "
                                  + ("they passed" if not failures else
                                     f"{len(failures)} failed"))
        return EXIT_OK if not failures else EXIT_FAILED
    if failures:
        report.data["message"] = f"FAILED: {len(failures)} part(s): " + "; ".join(failures)[:300]
        return EXIT_FAILED
    what = "rehearsal on the CPU passed" if rehearse else "this node runs FADRM correctly"
    report.data["message"] = what
    return EXIT_OK


# --------------------------------------------------------------------------- plumbing


def _setup_logging(out: Path, verbose: bool) -> None:
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(fmt)
    logfile = logging.FileHandler(out / "gpu_check.log", mode="w")
    logfile.setLevel(logging.DEBUG)
    logfile.setFormatter(fmt)
    root.handlers[:] = [console, logfile]
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _emit(text: str, out: Path) -> None:
    """Print ``text`` as is and append it to the log."""
    print(text, flush=True)
    with open(out / "gpu_check.log", "a") as fh:
        fh.write(text + "\n")


def _start_watchdog(report: Report, seconds: float, out: Path) -> threading.Timer:
    def expire() -> None:
        with report.lock:
            part = report.current or "start-up"
            if part and report.parts.get(part, {}).get("status") == "running":
                report.parts[part].update(
                    status="failed", error=f"timed out: the whole check exceeded {seconds:g} s")
            report.data.update(ok=False, exit_code=EXIT_FAILED,
                               message=f"timed out after {seconds:g} s in {part}")
            report.data["figures"] = figures(report)
        report.save()
        _emit(f"gpu_check: TIMED OUT after {seconds:g} s in {part}; partial results in "
              f"{report.path}", out)
        _emit(SUMMARY_PREFIX + json.dumps(summary_json(report), sort_keys=True), out)
        for clean_up in report.on_exit:
            try:
                clean_up()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(EXIT_FAILED)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


if __name__ == "__main__":
    sys.exit(main())
