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
3. the CUDA checks of :mod:`benchmarks.cuda_checks` (CUDA against the CPU, fp16 + GradScaler,
   BN hooks, relabel determinism, student and squeeze steps, NCCL + DDP);
4. the whole pipeline (squeeze, select, recover, relabel, evaluate) on CUDA through the
   local executor: FADRM+ with a torchvision teacher (trained by a one-epoch squeeze) and a
   timm teacher (given weights), on a synthetic 224 px ImageFolder;
5. speed at the paper's ImageNet-1K setting (preset ``imagenet1k-fadrm``): recover seconds
   per image extrapolated to the preset's iterations (beside the paper's 0.47 s on one RTX
   4090) with peak GPU memory and the fraction of the measured fp16 ``torch.mm`` peak it
   reaches; relabel and student images per second.

Every part is time-boxed and guarded: a failing part records its error and the rest still
run. Results go to ``OUT/gpu_check.json`` (schema in benchmarks/README.md, rewritten after
every part) and ``OUT/gpu_check.log``. Exit code: 0 all passed (or, without CUDA, the CPU
half passed), 1 something failed or timed out, 2 refused (no torch, or an unsupported GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Standard library only at import time (this script must start on a bare CUDA image).
from benchmarks.common import json_safe as _clean

REPO = Path(__file__).resolve().parent.parent
SCHEMA = "fadrm-gpu-check/1"
PRESET = "imagenet1k-fadrm"
PAPER_S_PER_IMAGE = 0.47
PAPER_GPU = "RTX 4090"
BLOCKED_MODULES = ("ray", "boto3", "botocore", "kubernetes", "moto")
REQUIRED_MODULES = ("torch", "torchvision", "timm", "pyarrow", "yaml", "numpy", "PIL", "tqdm",
                    "matplotlib")
EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
_CHILD_MARK = "GPU-CHECK-RAY-FREE "

log = logging.getLogger("gpu_check")


@dataclass(frozen=True)
class Sizes:
    """How big each part is. GPU: the real check; REHEARSAL: the GPU half on a CPU."""

    pipeline_classes: int = 4
    pipeline_per_class: int = 12
    recover_batch: int | None = None
    """None: the preset's recover.class_block_size (100 images, one per class)."""
    recover_budget_s: float = 45.0
    matmul_sizes: tuple[int, ...] = (4096, 8192)
    matmul_dtype: str = "float16"
    relabel_images: int = 400
    relabel_budget_s: float = 15.0
    student_images: int = 400
    student_budget_s: float = 20.0


GPU_SIZES = Sizes()
REHEARSAL_SIZES = Sizes(pipeline_per_class=6, recover_batch=4, recover_budget_s=8.0,
                        matmul_sizes=(256, 512), matmul_dtype="bfloat16", relabel_images=16,
                        relabel_budget_s=4.0, student_images=16, student_budget_s=4.0)


# --------------------------------------------------------------------------- the report


class Report:
    """The JSON being built; saved atomically after every part (a timeout leaves it valid)."""

    def __init__(self, out: Path, argv: list[str]):
        self.path = out / "gpu_check.json"
        self.started = time.perf_counter()
        self.lock = threading.RLock()
        self.current: str | None = None
        self.on_exit: list[Callable[[], None]] = []
        """Clean-ups the watchdog runs before it ends the process (child, temp folder)."""
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": ["python", "-m", "benchmarks.gpu_check", *argv],
            "fadrm_version": None,
            "ok": None,
            "exit_code": None,
            "message": "",
            "cuda_available": None,
            "rehearsal": False,
            "device": None,
            "environment": {},
            "parts": {},
            "figures": {},
            "failures": [],
            "wall_seconds": None,
        }

    @property
    def parts(self) -> dict[str, dict]:
        return self.data["parts"]

    def run(self, name: str, fn: Callable[..., dict | None], *args, **kwargs) -> dict:
        """Run one part; its result (or error) goes into ``parts[name]``."""
        record: dict[str, Any] = {"status": "running", "seconds": None, "error": None,
                                  "result": None}
        with self.lock:
            self.current = name
            self.parts[name] = record
        log.info("-- %s", name)
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
            record.update(status="passed", result=result)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            log.error("%s FAILED: %s: %s", name, type(exc).__name__, exc)
            log.debug("%s", traceback.format_exc())
        record["seconds"] = round(time.perf_counter() - start, 2)
        if record["status"] == "passed":
            log.info("   %s passed in %.1f s", name, record["seconds"])
        self._release_gpu_memory()
        self.save()
        return record

    def skip(self, name: str, reason: str) -> None:
        self.parts[name] = {"status": "skipped", "seconds": 0.0, "error": None,
                            "result": None, "reason": reason}

    @staticmethod
    def _release_gpu_memory() -> None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            try:
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a broken context is reported by the next part
                pass

    def failures(self) -> list[str]:
        return [f"{name}: {p['error'] or 'failed'}" for name, p in self.parts.items()
                if p["status"] in ("failed", "running")]

    def save(self) -> None:
        with self.lock:
            self.data["failures"] = self.failures()
            self.data["wall_seconds"] = round(time.perf_counter() - self.started, 1)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(_clean(self.data), indent=2) + "\n")
            tmp.replace(self.path)


# --------------------------------------------------------------------------- environment


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


def _gpu_smoke(device) -> None:
    """One kernel launch and a copy back: fails on a GPU without kernels in this build."""
    import torch

    x = torch.arange(1024, dtype=torch.float32, device=device)
    if float((x * 2).sum()) != 1023 * 1024:
        raise RuntimeError("a simple CUDA kernel returned a wrong result")


# --------------------------------------------------------------------------- synthetic data


def make_image_folder(root: Path, num_classes: int = 4, per_class: int = 12, size: int = 224,
                      seed: int = 0) -> Path:
    """An ImageFolder of JPEGs: per class a colour, a stripe frequency and pixel noise, so a
    teacher can tell the classes apart after a few steps."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(num_classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.uniform(40, 215, size=3)
        for i in range(per_class):
            angle = rng.uniform(0, np.pi)
            wave = np.sin(2 * np.pi * (c + 1) * (np.cos(angle) * xx + np.sin(angle) * yy))
            img = colour[None, None, :] + 35 * wave[..., None] + rng.normal(0, 20, (size, size, 3))
            pixels = np.clip(img, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def tiny_cpu_config(output: Path, data_root: Path, name: str = "tiny-cpu") -> dict:
    """A whole run that takes seconds on two CPU cores (32 px, convnet teacher and student)."""
    return {
        "name": name,
        "output": str(output),
        "seed": 0,
        "ipc": 1,
        "data": {"kind": "imagefolder", "root": str(data_root), "val_per_class": 2,
                 "resolution": 32, "channels": 3, "mean": MEAN, "std": STD},
        "teachers": [{"model": "convnet"}],
        "squeeze": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "select": {"num_candidates": 4, "num_crops": 2},
        "recover": {"method": "fadrm", "resolutions": [24, 32], "stage_iterations": [2, 2],
                    "lr": 0.1},
        "relabel": {"epochs": 2, "batch_size": 4, "epochs_per_shard": 1},
        "student": {"model": "convnet", "accumulation_steps": 1, "eval_every": 1},
        "execution": {"device": "cpu"},
    }


def gpu_pipeline_config(output: Path, data_root: Path, timm_weights: Path,
                        device: str) -> dict:
    """FADRM+ at 224 px with one torchvision teacher (squeezed) and one timm teacher (given)."""
    return {
        "name": "gpu-check",
        "output": str(output),
        "seed": 0,
        "ipc": 2,
        "data": {"kind": "imagefolder", "root": str(data_root), "val_per_class": 2,
                 "resolution": 224, "channels": 3, "mean": MEAN, "std": STD},
        "teachers": [{"model": "torchvision:resnet18"},
                     {"model": TIMM_TEACHER, "weights": str(timm_weights)}],
        "squeeze": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "select": {"num_candidates": 4, "num_crops": 2},
        "recover": {"method": "fadrm+", "resolutions": [200, 224, 200, 224],
                    "stage_iterations": [2, 2, 2, 2], "lr": 0.25, "jitter": 32},
        "relabel": {"epochs": 2, "batch_size": 4, "epochs_per_shard": 1},
        "student": {"model": "resnet18", "accumulation_steps": 2, "eval_every": 1},
        "execution": {"device": device},
    }


TIMM_TEACHER = "timm:mobilenetv3_small_050"


# --------------------------------------------------------------------------- CPU half


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
    return finish_ray_free_run(start_ray_free_run(config_path), timeout)


def report_dir(cfg: dict) -> Path:
    """Where a finished run's report is: ``runs/<name>/latest`` (a link to the config's
    own report folder), or ``runs/<name>`` itself in the older layout."""
    runs = Path(cfg["output"]) / "runs" / cfg["name"]
    return runs / "latest" if (runs / "latest").exists() else runs


def _check_tiny_outputs(cfg: dict) -> dict:
    run_dir = report_dir(cfg)
    for name in ("metrics.json", "manifest.json"):
        if not (run_dir / name).is_file():
            raise AssertionError(f"the Ray-free run wrote no {run_dir / name}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"run_dir": str(run_dir), "student_top1": metrics.get("student_top1"),
            "num_images": metrics.get("num_images")}


# --------------------------------------------------------------------------- GPU half


def run_cuda_check(check, device: str) -> dict:
    check.run(device) if check.needs_cuda else check.run()
    return {"what": check.summary}


def pipeline_on_device(work: Path, device: str, sizes: Sizes) -> dict:
    """The whole pipeline on ``device`` through ``fadrm run CONFIG --executor local``; then
    the same command again must find everything up to date and rewrite nothing."""
    import torch
    import yaml

    from fadrm.cli import main
    from fadrm.models import create_model, save_weights

    data = make_image_folder(work / "images", sizes.pipeline_classes, sizes.pipeline_per_class,
                             224, seed=1)
    torch.manual_seed(0)
    weights = work / "timm-teacher.pt"
    save_weights(create_model(TIMM_TEACHER, sizes.pipeline_classes, 3, 224), str(weights))
    cfg = gpu_pipeline_config(work / "out", data, weights, device)
    path = work / "gpu-check.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = ["run", str(path), "--executor", "local", "--no-progress"]

    def fadrm_run() -> int:
        err = io.StringIO()  # the CLI's one-line error (and, with -v, its traceback)
        with contextlib.redirect_stderr(err):
            code = main(["-v", *command])
        if err.getvalue().strip():
            log.debug("fadrm run stderr:\n%s", err.getvalue())
        if code != 0:
            lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")]
            raise AssertionError(f"fadrm {' '.join(command)} exited with {code}: "
                                 f"{lines[-1] if lines else 'see the log'}")
        return code

    start = time.perf_counter()
    fadrm_run()
    seconds = time.perf_counter() - start
    run_dir = report_dir(cfg)
    for name in ("metrics.json", "manifest.json", "grid.png"):
        if not (run_dir / name).is_file():
            raise AssertionError(f"the pipeline wrote no {run_dir / name}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("teacher_top1", "student_top1", "student_top5"):
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise AssertionError(f"metrics {key} = {value!r}")
    expected = sizes.pipeline_classes * cfg["ipc"]
    if metrics.get("num_images") != expected:
        raise AssertionError(f"{metrics.get('num_images')} distilled images, expected "
                             f"{expected}")
    manifest = run_dir / "manifest.json"
    stages = {s["stage"] for s in json.loads(manifest.read_text())["shards"]}
    if not {"squeeze", "select", "recover", "relabel", "evaluate"} <= stages:
        raise AssertionError(f"manifest has shards of {sorted(stages)} only")

    written = manifest.stat().st_mtime_ns
    fadrm_run()
    if manifest.stat().st_mtime_ns != written:
        raise AssertionError("re-running the unchanged config rewrote the report")
    return {"seconds": round(seconds, 1), "stage_seconds": metrics.get("stage_seconds"),
            "teachers": [t["model"] for t in cfg["teachers"]], "method": cfg["recover"]["method"],
            "teacher_top1": metrics["teacher_top1"], "student_top1": metrics["student_top1"],
            "num_images": metrics["num_images"], "run_dir": str(run_dir)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_matmul(device, sizes: Sizes) -> dict:
    """The best ``torch.mm`` rate on square matrices (FLOP/s), the peak for the fractions."""
    import torch

    dtype = getattr(torch, sizes.matmul_dtype)
    rates = {}
    for n in sizes.matmul_sizes:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        out = torch.mm(a, b)
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        once = max(time.perf_counter() - start, 1e-6)
        reps = max(3, min(200, int(0.25 / once)))
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            _sync(device)
            best = min(best, (time.perf_counter() - start) / reps)
        rates[n] = 2 * n**3 / best
        del a, b, out
    peak = max(rates.values())
    return {"dtype": sizes.matmul_dtype, "peak_tflops": peak / 1e12,
            "by_size_tflops": {str(n): r / 1e12 for n, r in rates.items()}}


@dataclass
class _Speed:
    """What the recover benchmark leaves for the others: the preset and its teacher."""

    preset: Any = None
    teacher: Any = None


def bench_recover(device, sizes: Sizes, state: _Speed, fp16_peak: float | None) -> dict:
    """Recover at the preset's ImageNet-1K setting over a timed window, extrapolated."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fadrm.config import load_config
    from fadrm.models import create_model
    from fadrm.synthesis import recover

    preset = load_config(PRESET)
    rc = preset.recover
    num_classes = 1000
    batch = sizes.recover_batch or rc.class_block_size or 100
    size = preset.data.resolution
    torch.manual_seed(0)
    teacher = create_model(preset.teachers[0].model, num_classes, 3, size).to(device).eval()
    state.preset, state.teacher = preset, teacher
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(batch, 3, size, size, generator=gen).clamp(-2, 2)
    labels = torch.arange(batch) % num_classes
    full = list(rc.stage_iterations)

    def run(iterations: list[int]) -> float:
        cfg = dataclasses.replace(rc, stage_iterations=iterations)
        _sync(device)
        start = time.perf_counter()
        recover(init, labels, [teacher], cfg, preset.data.mean, preset.data.std, size, seed=0,
                device=device)
        _sync(device)
        return time.perf_counter() - start

    stages = len(full)
    warmup = run([1] * stages)  # kernel selection and allocator warm-up at every resolution
    estimate = run([2] * stages) / (2 * stages)
    fraction = min(1.0, 0.6 * sizes.recover_budget_s / (estimate * sum(full)))
    window = [max(2, min(n, round(n * fraction))) for n in full]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    seconds = run(window)
    peak_mib = working_mib = None
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        working_mib = peak_mib - base / 2**20
    per_iteration = seconds / sum(window)
    total = seconds * sum(full) / sum(window)

    flops = []
    for i in range(stages):  # one iteration at each stage's resolution
        one = [0] * stages
        one[i] = 1
        with FlopCounterMode(display=False) as counter:
            run(one)
        flops.append(counter.get_total_flops())
    flops_per_iteration = sum(f * n for f, n in zip(flops, full)) / sum(full)
    rate = flops_per_iteration / per_iteration
    out = {
        "preset": PRESET, "teacher": preset.teachers[0].model, "classes": num_classes,
        "batch": batch, "resolutions": list(rc.resolutions), "preset_iterations": full,
        "timed_iterations": window, "method": rc.method,
        "mixed_precision": rc.spec.mixed_precision, "warmup_seconds": warmup,
        "window_seconds": seconds, "seconds_per_iteration": per_iteration,
        "extrapolated_seconds_per_batch": total,
        "seconds_per_image": total / batch,
        "paper_seconds_per_image": PAPER_S_PER_IMAGE, "paper_gpu": PAPER_GPU,
        "vs_paper": (total / batch) / PAPER_S_PER_IMAGE,
        "peak_gpu_mib": peak_mib, "working_gpu_mib": working_mib,
        "gflop_per_iteration": flops_per_iteration / 1e9,
        "gflop_per_iteration_by_stage": [f / 1e9 for f in flops],
        "achieved_tflops": rate / 1e12,
        "fraction_of_fp16_peak": rate / fp16_peak if fp16_peak else None,
    }
    log.info("   recover: %.3f s/image extrapolated to %d iterations (paper: %.2f s on one "
             "%s), %.1f ms/iteration, peak %s MiB", out["seconds_per_image"], sum(full),
             PAPER_S_PER_IMAGE, PAPER_GPU, per_iteration * 1e3,
             f"{peak_mib:.0f}" if peak_mib is not None else "-")
    return out


def _speed_state(device, state: _Speed):
    """The preset and a ResNet-18 teacher (from the recover benchmark, or built here)."""
    import torch

    from fadrm.config import load_config
    from fadrm.models import create_model

    if state.preset is None:
        state.preset = load_config(PRESET)
    if state.teacher is None:
        torch.manual_seed(0)
        state.teacher = create_model(state.preset.teachers[0].model, 1000, 3,
                                     state.preset.data.resolution).to(device).eval()
    return state.preset, state.teacher


def _random_images(n: int, size: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def bench_relabel(device, sizes: Sizes, state: _Speed) -> dict:
    """Relabel images per second with the preset's relabel settings and teacher."""
    from fadrm.relabel import relabel_epochs

    preset, teacher = _speed_state(device, state)
    rcfg = preset.relabel
    images = _random_images(sizes.relabel_images, preset.data.resolution, seed=2)
    n = len(images)

    def run(epochs: range) -> tuple[float, Any]:
        _sync(device)
        start = time.perf_counter()
        table = relabel_epochs([teacher], images, preset.data.mean, preset.data.std, rcfg,
                               epochs, seed=0, device=device)
        _sync(device)
        return time.perf_counter() - start, table

    first, _ = run(range(1))  # warm-up, and the size of the timed window
    epochs = max(1, min(10, int(sizes.relabel_budget_s * 0.6 / max(first, 1e-3))))
    seconds, _ = run(range(1, 1 + epochs))
    return {"teacher": preset.teachers[0].model, "images": n, "batch": rcfg.batch_size,
            "teacher_bn_mode": rcfg.teacher_bn_mode, "epochs": epochs, "seconds": seconds,
            "images_per_s": n * epochs / seconds}


def bench_student(device, sizes: Sizes, state: _Speed) -> dict:
    """Student images per second at the preset's batch (relabel batch, accumulation)."""
    import torch

    from fadrm.data import ImageSet
    from fadrm.models import create_model
    from fadrm.relabel import relabel_epochs
    from fadrm.student import train_student

    preset, teacher = _speed_state(device, state)
    size, num_classes = preset.data.resolution, 1000
    images = _random_images(sizes.student_images, size, seed=3)
    n = len(images)
    table = relabel_epochs([teacher], images, preset.data.mean, preset.data.std,
                           preset.relabel, range(4), seed=0, device=device)
    val = ImageSet(images[:16], torch.arange(16) % num_classes,
                   [f"c{i}" for i in range(num_classes)])
    cfg = dataclasses.replace(preset.student, eval_every=0, eval_batch_size=16)

    def run(num_epochs: int) -> float:
        torch.manual_seed(0)
        model = create_model(preset.student.model, num_classes, 3, size).to(device)
        result = train_student(model, images, lambda _epoch: table, val, cfg, num_epochs,
                               preset.data.mean, preset.data.std, num_classes, device, seed=0)
        if not math.isfinite(result["history"][-1]["loss"]):
            raise AssertionError(f"student loss {result['history'][-1]['loss']}")
        return result["seconds"]

    first = run(1)  # warm-up, and the size of the timed window
    epochs = max(1, min(4, int(sizes.student_budget_s * 0.6 / max(first, 1e-3))))
    seconds = run(epochs)
    return {"model": preset.student.model, "images": n, "batch": preset.relabel.batch_size,
            "accumulation_steps": cfg.accumulation_steps,
            "mixed_precision": cfg.mixed_precision, "epochs": epochs, "seconds": seconds,
            "images_per_s": n * epochs / seconds}


# --------------------------------------------------------------------------- driver


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


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def summary_table(report: Report) -> str:
    rows = [("part", "status", "seconds", "detail")]
    for name, p in report.parts.items():
        detail = p.get("reason") or (p["error"] or "")[:70]
        rows.append((name, p["status"], _fmt(p["seconds"], ".1f"), detail))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]:>{width[2]}}  {r[3]}"
             for r in rows]
    lines.insert(1, "-" * (sum(width) + 6 + 20))
    f = report.data["figures"]
    if report.data["device"] and any(f.get(k) is not None for k in _MEASURED):
        student = (report.parts.get("speed.student") or {}).get("result") or {}
        at = (f"batch {student['batch']} x {student['accumulation_steps']}"
              if student else "preset batch")
        lines += ["", "figure                                  value",
                  f"recover s/image (preset, extrapolated)  "
                  f"{_fmt(f.get('recover_s_per_image'))}   (paper: {PAPER_S_PER_IMAGE} s on "
                  f"one {PAPER_GPU})",
                  f"recover peak GPU memory, MiB            "
                  f"{_fmt(f.get('recover_peak_gpu_mib'), '.0f')}",
                  f"recover TFLOP/s, of the mm peak         {_fmt(f.get('recover_tflops'))}, "
                  f"{_fmt(f.get('recover_fraction_of_fp16_peak'), '.1%')}",
                  f"torch.mm peak TFLOP/s                   "
                  f"{_fmt(f.get('matmul_peak_tflops'))}",
                  f"relabel images/s                        "
                  f"{_fmt(f.get('relabel_images_per_s'))}",
                  f"student images/s ({at})".ljust(40) + _fmt(f.get("student_images_per_s")),
                  f"whole pipeline on the device, s         "
                  f"{_fmt(f.get('pipeline_seconds'), '.1f')}"]
    return "\n".join(lines)


_MEASURED = ("recover_s_per_image", "matmul_peak_tflops", "relabel_images_per_s",
             "student_images_per_s", "pipeline_seconds")


def _figures(report: Report) -> dict:
    def result(name: str) -> dict:
        part = report.parts.get(name) or {}
        return part.get("result") or {}

    rec, mm = result("speed.recover"), result("speed.matmul_peak")
    return {
        "recover_s_per_image": rec.get("seconds_per_image"),
        "paper_recover_s_per_image": PAPER_S_PER_IMAGE,
        "paper_gpu": PAPER_GPU,
        "recover_vs_paper": rec.get("vs_paper"),
        "recover_peak_gpu_mib": rec.get("peak_gpu_mib"),
        "recover_tflops": rec.get("achieved_tflops"),
        "recover_fraction_of_fp16_peak": rec.get("fraction_of_fp16_peak"),
        "matmul_peak_tflops": mm.get("peak_tflops"),
        "relabel_images_per_s": result("speed.relabel").get("images_per_s"),
        "student_images_per_s": result("speed.student").get("images_per_s"),
        "pipeline_seconds": result("pipeline.local_executor").get("seconds"),
    }


def _start_watchdog(report: Report, seconds: float, out: Path) -> threading.Timer:
    def expire() -> None:
        with report.lock:
            part = report.current or "start-up"
            if part and report.parts.get(part, {}).get("status") == "running":
                report.parts[part].update(
                    status="failed", error=f"timed out: the whole check exceeded {seconds:g} s")
            report.data.update(ok=False, exit_code=EXIT_FAILED,
                               message=f"timed out after {seconds:g} s in {part}")
        report.save()
        _emit(f"gpu_check: TIMED OUT after {seconds:g} s in {part}; partial results in "
              f"{report.path}", out)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check that this (GPU) node runs FADRM correctly, and how fast.")
    parser.add_argument("--out", default="gpu-check-out",
                        help="folder for gpu_check.json and gpu_check.log (default "
                             "gpu-check-out)")
    parser.add_argument("--max-seconds", type=float, default=420.0,
                        help="hard limit for the whole check; parts still running then are "
                             "recorded as timed out (default 420)")
    parser.add_argument("--no-speed", action="store_true",
                        help="correctness only: skip the speed measurements")
    parser.add_argument("--rehearse", action="store_true",
                        help="run the GPU half on the CPU at toy sizes (for developing this "
                             "script on a machine without a GPU; figures are meaningless)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

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
        return EXIT_REFUSED
    _start_watchdog(report, args.max_seconds, out)
    try:
        code = _run(report, args, out)
    except Exception as exc:  # noqa: BLE001 - recorded; the JSON is still written
        log.error("gpu_check itself failed: %s", traceback.format_exc())
        report.parts["gpu_check"] = {"status": "failed", "seconds": None, "result": None,
                                     "error": f"{type(exc).__name__}: {exc}"}
        report.data["message"] = f"FAILED: gpu_check itself: {type(exc).__name__}: {exc}"
        code = EXIT_FAILED
    report.data.update(exit_code=code, ok=code == EXIT_OK)
    report.data["figures"] = _figures(report)
    report.save()
    _emit("\n" + summary_table(report), out)
    _emit(f"\ngpu_check: {report.data['message']} (exit {code}; {report.path})", out)
    return code


def _run(report: Report, args, out: Path) -> int:
    import torch

    import fadrm
    from benchmarks import cuda_checks

    report.data["fadrm_version"] = fadrm.__version__
    env = environment()
    report.data["environment"] = env
    cuda = cuda_checks.cuda_available()
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
    work = Path(tempfile.mkdtemp(prefix="fadrm-gpu-check-"))
    report.on_exit.append(lambda: shutil.rmtree(work, ignore_errors=True))
    try:
        # The CPU half runs in a child process, beside the GPU half.
        try:
            child, cpu_cfg = _start_cpu_half(work)
            report.on_exit.append(child.kill)
            child_started = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - recorded as the part's failure
            child = None
            report.parts["cpu.ray_free_run"] = {
                "status": "failed", "seconds": 0.0, "result": None,
                "error": f"could not start: {type(exc).__name__}: {exc}"}

        refused = None
        if args.rehearse:
            device = torch.device("cpu")
        elif not cuda:
            device = None
        elif not env["supported"]:
            device, refused = None, env["support"]
        else:
            device = torch.device("cuda", 0)
        report.data["device"] = str(device) if device is not None else None

        if device is not None:
            _gpu_half(report, device, args, work)
        else:
            reason = (f"GPU not supported: {refused}" if refused else
                      "no CUDA GPU" + ("" if torch.version.cuda else
                                       f" (torch {torch.__version__} is a CPU-only build)"))
            for check in cuda_checks.CHECKS:
                if check.needs_cuda:
                    report.skip(f"check.{check.name}", reason)
                else:
                    report.run(f"check.{check.name}", run_cuda_check, check, "cpu")
            for name in ("pipeline.local_executor", "speed.matmul_peak", "speed.recover",
                         "speed.relabel", "speed.student"):
                report.skip(name, reason)

        if child is not None:
            report.run("cpu.ray_free_run", lambda: {
                **finish_ray_free_run(child), **_check_tiny_outputs(cpu_cfg),
                "child_seconds": round(time.perf_counter() - child_started, 1)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

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
    what = "rehearsal on the CPU passed" if args.rehearse else "this node runs FADRM correctly"
    report.data["message"] = what
    return EXIT_OK


def _start_cpu_half(work: Path) -> tuple[subprocess.Popen, dict]:
    import yaml

    cfg = tiny_cpu_config(work / "cpu-out", make_image_folder(work / "cpu-images", 4, 6, 32))
    path = work / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return start_ray_free_run(path), cfg


def _gpu_half(report: Report, device, args, work: Path) -> None:
    from benchmarks import cuda_checks

    sizes = REHEARSAL_SIZES if args.rehearse else GPU_SIZES
    speed = ("speed.matmul_peak", "speed.recover", "speed.relabel", "speed.student")
    smoke = report.run("gpu.smoke", _gpu_smoke, device)
    if smoke["status"] != "passed":
        for name in [f"check.{c.name}" for c in cuda_checks.CHECKS] + [
                "pipeline.local_executor", *speed]:
            report.skip(name, "the GPU failed its first kernel launch (gpu.smoke)")
        return
    for check in cuda_checks.CHECKS:
        report.run(f"check.{check.name}", run_cuda_check, check, device.type)
    report.run("pipeline.local_executor", pipeline_on_device, work / "pipeline", device.type,
               sizes)
    if args.no_speed:
        for name in speed:
            report.skip(name, "--no-speed")
        return
    mm = report.run("speed.matmul_peak", bench_matmul, device, sizes)
    peak = (mm.get("result") or {}).get("peak_tflops")
    state = _Speed()
    report.run("speed.recover", bench_recover, device, sizes, state,
               peak * 1e12 if peak else None)
    report.run("speed.relabel", bench_relabel, device, sizes, state)
    report.run("speed.student", bench_student, device, sizes, state)


if __name__ == "__main__":
    sys.exit(main())
