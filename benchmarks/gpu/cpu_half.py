"""Part 2 of the check, the CPU half (runs on machines without CUDA too): in a child process
in which ray, boto3, botocore, kubernetes and moto cannot be imported, every ``fadrm`` module
imports and a tiny config runs through ``fadrm run --executor local`` on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu.common import (BLOCKED_MODULES, REPO, make_image_folder, report_dir,
                                   tiny_cpu_config)

_CHILD_MARK = "GPU-CHECK-RAY-FREE "

_RAY_FREE_CHILD = r"""
import sys
BLOCKED = {blocked!r}
for _name in BLOCKED:
    sys.modules[_name] = None  # `import ray` now raises ImportError
import importlib, json, pkgutil
import fadrm
modules, failed = [], {{}}
for info in pkgutil.walk_packages(fadrm.__path__, "fadrm."):
    try:
        importlib.import_module(info.name)
        modules.append(info.name)
    except Exception as exc:
        failed[info.name] = f"{{type(exc).__name__}}: {{exc}}"
blocked_ok = True
for _name in BLOCKED:
    try:
        __import__(_name)
        blocked_ok = False
    except ImportError:
        pass
code = None
if not failed and len(sys.argv) > 1:
    from fadrm.cli import main
    code = main(["run", sys.argv[1], "--executor", "local", "--no-progress"])
print({mark!r} + json.dumps({{"modules": modules, "failed_imports": failed,
                             "blocked_ok": blocked_ok, "exit_code": code}}), flush=True)
sys.exit(1 if failed else (code or 0))
"""


def start_ray_free_run(config_path: Path | None, threads: int = 2) -> subprocess.Popen:
    """Start the Ray-free child: import every fadrm module, then ``fadrm run CONFIG
    --executor local`` (skipped when ``config_path`` is None), with the blocked packages
    unimportable and CUDA hidden."""
    script = _RAY_FREE_CHILD.format(blocked=BLOCKED_MODULES, mark=_CHILD_MARK)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", str(threads))
    args = [sys.executable, "-c", script] + ([str(config_path)] if config_path else [])
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_ray_free_run(proc: subprocess.Popen, timeout: float = 240) -> dict:
    """Wait for the child; its report, or RuntimeError with its output's tail."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise RuntimeError(f"the Ray-free run took over {timeout:.0f} s:\n{stderr[-2000:]}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith(_CHILD_MARK)]
    result = json.loads(lines[-1][len(_CHILD_MARK):]) if lines else None
    if result is None or proc.returncode != 0:
        detail = (f"failed imports: {result['failed_imports']}" if result and
                  result["failed_imports"] else f"exit code {proc.returncode}")
        raise RuntimeError(f"Ray-free run without {', '.join(BLOCKED_MODULES)}: {detail}\n"
                           f"{stdout[-1500:]}\n{stderr[-2500:]}")
    if not result["blocked_ok"]:
        raise RuntimeError("the child could still import a blocked package")
    return result


def ray_free_run(config_path: Path | None, timeout: float = 240) -> dict:
    """Start the Ray-free child and wait for its report."""
    return finish_ray_free_run(start_ray_free_run(config_path), timeout)


def start_cpu_half(work: Path) -> tuple[subprocess.Popen, dict]:
    """Write the tiny config and its images under ``work`` and start the child on them."""
    import yaml

    cfg = tiny_cpu_config(work / "cpu-out", make_image_folder(work / "cpu-images", 4, 6, 32))
    path = work / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return start_ray_free_run(path), cfg


def check_tiny_outputs(cfg: dict) -> dict:
    """The child's run wrote its report; what the check records of it."""
    run_dir = report_dir(cfg)
    for name in ("metrics.json", "manifest.json"):
        if not (run_dir / name).is_file():
            raise AssertionError(f"the Ray-free run wrote no {run_dir / name}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"run_dir": str(run_dir), "student_top1": metrics.get("student_top1"),
            "num_images": metrics.get("num_images")}
