"""Part 1 of the check: the machine (GPU, driver, torch / CUDA / cuDNN / NCCL) and whether
this torch build has kernels for its GPU."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.gpu.common import BLOCKED_MODULES, REQUIRED_MODULES


def _version(module: str) -> str | None:
    dist = {"yaml": "pyyaml", "PIL": "pillow"}.get(module, module)
    try:
        return importlib.metadata.version(dist)
    except Exception:  # noqa: BLE001 - not installed as a distribution
        mod = sys.modules.get(module)
        return getattr(mod, "__version__", None)


def missing_modules(names: tuple[str, ...] = REQUIRED_MODULES) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def driver_version() -> str | None:
    """The NVIDIA driver version (nvidia-smi, else /proc/driver/nvidia/version)."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(\d+[\d.]*)", text) or re.search(
        r"\s(\d{3}\.\d+(?:\.\d+)?)\s", text)
    return match.group(1) if match else None


def arch_support(capability: tuple[int, int], arch_list: list[str]) -> tuple[bool, str]:
    """Whether a torch built for ``arch_list`` has kernels for a GPU of ``capability``.

    sm_XY kernels run on GPUs of the same major version and minor >= Y (arch-specific
    ``sm_90a``-style ones only on exactly X.Y); a ``compute_XY`` (PTX) entry is compiled at
    start-up for any GPU >= X.Y.
    """
    major, minor = capability
    ptx = []
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)([a-z]*)", arch)
        if not match:
            continue
        number = int(match.group(2))
        cc = (number // 10, number % 10)
        if match.group(1) == "sm":
            if cc == capability or (not match.group(3) and cc[0] == major and cc[1] <= minor):
                return True, f"kernels for {arch}"
        elif not match.group(3) and cc <= capability:
            ptx.append(arch)
    if ptx:
        return True, (f"no sm_{major}{minor} kernels; {ptx[-1]} PTX is JIT-compiled at start-up "
                      "(slow first run)")
    return False, (f"the GPU is sm_{major}{minor} (compute capability {major}.{minor}) but this "
                   f"torch build has kernels only for {', '.join(arch_list) or 'no GPU'}")


def environment() -> dict:
    """The report's ``environment``: versions, GPUs, and whether this build supports GPU 0."""
    import torch

    from benchmarks import common

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": common._cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": common._memory_gib(),
        "packages": {m: _version(m) for m in REQUIRED_MODULES},
        "missing_packages": missing_modules(),
        "absent_optional": [m for m in BLOCKED_MODULES if importlib.util.find_spec(m) is None],
        "torch_cuda": torch.version.cuda,
        "cudnn": None,
        "nccl": None,
        "arch_list": torch.cuda.get_arch_list() if torch.version.cuda else [],
        "driver": None,
        "gpu_count": 0,
        "gpus": [],
        "capability": None,
        "supported": None,
        "support": None,
    }
    if not torch.cuda.is_available():
        return env
    env["driver"] = driver_version()
    env["cudnn"] = torch.backends.cudnn.version()
    try:
        nccl = torch.cuda.nccl.version()
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception:  # noqa: BLE001 - a build without NCCL; the NCCL check reports it
        pass
    env["gpu_count"] = torch.cuda.device_count()
    for i in range(env["gpu_count"]):
        p = torch.cuda.get_device_properties(i)
        env["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                            "memory_gib": round(p.total_memory / 2**30, 1),
                            "multiprocessors": p.multi_processor_count})
    capability = torch.cuda.get_device_capability(0)
    env["capability"] = f"{capability[0]}.{capability[1]}"
    env["supported"], env["support"] = arch_support(capability, env["arch_list"])
    return env


def gpu_smoke(device) -> None:
    """One kernel launch and a copy back: fails on a GPU without kernels in this build."""
    import torch

    x = torch.arange(1024, dtype=torch.float32, device=device)
    if float((x * 2).sum()) != 1023 * 1024:
        raise RuntimeError("a simple CUDA kernel returned a wrong result")

