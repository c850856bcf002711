"""Shared helpers of the benchmarks: machine info, medians, memory, result files.

Every benchmark writes ``benchmarks/results/<name>.json`` (numbers, not strings, plus the
machine and the settings it ran with) and ``benchmarks/results/<name>.md`` (a markdown
table that ``benchmarks/README.md`` quotes). Speed and memory are always measured as ratios
against a baseline in the same run, as medians over repeats: these machines are shared and
noisy.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10-train"
_CHILD_MARK = "BENCH-RESULT "


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")
                return [f for f in flags if f in keep]
    except OSError:
        pass
    return []


def _memory_gib() -> float:
    try:
        text = Path("/proc/meminfo").read_text()
        return round(int(re.search(r"MemTotal:\s+(\d+)", text).group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        return math.nan


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (goes into every result file)."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['cpu']} ({info['cores']} cores, {info['memory_gib']} GiB, torch "
            f"{info['torch']}, {info['torch_threads']} torch threads{gpu}; load average "
            f"{info['load_average_1min']} at the start)")


# --------------------------------------------------------------------------- statistics


def median(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    return statistics.median(vals) if vals else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    if len(vals) == 1:
        return vals[0], 0.0
    return statistics.fmean(vals), statistics.stdev(vals)


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


# --------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else -1


def rss_mib() -> float:
    """Resident set size of this process now (MiB)."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set (VmHWM, MiB)."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- subprocesses


def emit(result: dict) -> None:
    """Print a child's result for :func:`run_child` (the last marked line wins)."""
    print(_CHILD_MARK + json.dumps(result), flush=True)


def run_child(module: str, args: list[str], timeout: float = 3600) -> dict:
    """Run ``python -m module *args`` in a fresh process and return what it :func:`emit`-ted."""
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(_CHILD_MARK):])


# --------------------------------------------------------------------------- result files


def json_safe(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, numpy/torch scalars -> Python numbers,
    anything else JSON cannot hold -> its str()."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (TypeError, ValueError, RuntimeError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


_clean = json_safe


def write_json(name: str, data: dict, results: Path = RESULTS) -> Path:
    """``results/<name>.json`` with a timestamp added; returns the path."""
    results.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name,
               "written": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
               **data}
    path = results / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=2) + "\n")
    tmp.replace(path)
    return path


def read_json(name: str, results: Path = RESULTS) -> dict | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   digits: int = 2) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def write_markdown(name: str, title: str, sections: Sequence[str],
                   results: Path = RESULTS) -> Path:
    """``results/<name>.md``: a title and the given markdown sections."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.md"
    path.write_text(f"### {title}\n\n" + "\n\n".join(sections).rstrip() + "\n")
    return path


def set_threads(threads: int | None) -> int:
    """Use ``threads`` torch intra-op threads (None: all cores); returns the count."""
    import torch

    n = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- pipeline runs

WORK = Path(__file__).resolve().parent / "work"
"""Default output root of the benchmarks' pipeline runs (shared: content keys reuse work)."""

QUICK_RESULTS = WORK / "results-quick"
"""Where ``--quick`` (smoke size) runs write their results: never over the committed
``benchmarks/results/`` files, which hold full-size measurements (``benchmarks/work/`` is
not tracked)."""


def results_dir(quick: bool, given: str | Path | None = None) -> Path:
    """The results folder of a run: ``given`` (``--results``) when set, else
    :data:`QUICK_RESULTS` for ``--quick`` runs and :data:`RESULTS` otherwise."""
    if given is not None:
        return Path(given)
    return QUICK_RESULTS if quick else RESULTS

DATASETS: dict[str, dict[str, Any]] = {
    # CIFAR-10 as an ImageFolder of JPEGs; 1,000 images per class held out for validation
    # (never used for training or selection). shared/ is copied in afresh (new mtimes) for
    # every session, so the fingerprint hashes the bytes: teachers and stages are reused.
    "cifar10": {"kind": "imagefolder", "root": str(CIFAR10), "val_per_class": 1000,
                "resolution": 32, "channels": 3, "mean": [0.4914, 0.4822, 0.4465],
                "std": [0.2470, 0.2435, 0.2616], "fingerprint": "content"},
    # Fashion-MNIST IDX files; validation = the official 10,000 test images.
    "fmnist": {"kind": "idx", "root": str(FASHION_MNIST), "resolution": 28, "channels": 1,
               "mean": [0.2860], "std": [0.3530]},
}

_DATA_CACHE: dict[str, Any] = {}


def cache_data_loading() -> None:
    """Memoise ``fadrm.data.load_data`` in this process.

    The benchmarks run many pipelines over the same data in one process (LocalExecutor);
    every stage's setup reloads it, and decoding CIFAR-10's 50,000 JPEGs costs ~16 s each
    time. The cache returns the very tensors a fresh decode would give.
    """
    import dataclasses

    import fadrm.data as fdata

    if getattr(fdata.load_data, "_benchmark_cache", False):
        return
    original = fdata.load_data

    def load_data(cfg, progress=None):
        key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
        if key not in _DATA_CACHE:
            _DATA_CACHE[key] = original(cfg, progress)
        return _DATA_CACHE[key]

    load_data._benchmark_cache = True  # type: ignore[attr-defined]
    fdata.load_data = load_data


def run_local(cfg_dict: dict, device: str = "auto") -> dict:
    """Run (or resume) one pipeline in this process; returns its metrics."""
    from fadrm.config import load_config
    from fadrm.executors import LocalExecutor
    from fadrm.runner import run_pipeline

    cache_data_loading()
    return run_pipeline(load_config(cfg_dict), LocalExecutor(device), show_progress=False)


def train_teachers(data: dict, teachers: list[dict], squeeze: dict, output: Path,
                   device: str = "auto") -> list[str]:
    """Train (or find already trained) squeeze teachers; returns their weight paths.

    Teachers are trained once per (data, architecture, squeeze settings), under seed 0, and
    then passed as ``weights`` to every run, so all seeds and methods share them.
    """
    from fadrm.config import load_config
    from fadrm.executors import LocalExecutor
    from fadrm.plan import RunPlan
    from fadrm.progress import StageProgress

    cache_data_loading()
    cfg = load_config({"name": "teachers", "output": str(output), "seed": 0, "data": data,
                       "teachers": teachers, "squeeze": squeeze,
                       "execution": {"device": device}})
    plan = RunPlan(cfg)
    exe = LocalExecutor(device)
    paths = []
    for i in range(len(teachers)):
        stage = plan.squeeze_stage(i)
        pending = stage.pending()
        if pending:
            exe.run_stage(stage, pending, StageProgress(f"squeeze[{i}]", 1, enabled=False))
        paths.append(stage.unit_uri("teacher"))
    return paths


def teacher_val_top1(teacher_uri: str) -> float | None:
    """The validation top-1 the squeeze stage recorded beside a teacher's weights."""
    meta = Path(teacher_uri).parent / "meta.json"
    if not meta.exists():
        return None
    return json.loads(meta.read_text()).get("val_top1")
