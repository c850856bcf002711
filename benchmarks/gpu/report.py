"""The check's record: ``OUT/gpu_check.json`` (schema in benchmarks/README.md), the figures
taken from its parts, and the summary table printed at the end."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import json_safe as _clean
from benchmarks.gpu.common import PAPER_GPU, PAPER_PLUS_S_PER_IMAGE, PAPER_S_PER_IMAGE

SCHEMA = "fadrm-gpu-check/2"
EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2

log = logging.getLogger("gpu_check")


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


# --------------------------------------------------------------------------- summary


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def summary_table(report: Report) -> str:
    """One line per part, then the figures when the device half measured any."""
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
        at = student_batch_words(student) if student else "preset batch"
        precision = f.get("precision") or "default"
        lines += ["", "figure                                  value",
                  f"recover s/image (preset, extrapolated)  "
                  f"{_fmt(f.get('recover_s_per_image'))}   ({precision}; paper: "
                  f"{PAPER_S_PER_IMAGE} s on one {PAPER_GPU})",
                  f"  the loop before issue 23              "
                  f"{_fmt(f.get('recover_s_per_image_old_path'))}   (fp16 + GradScaler, "
                  f"eager, host reads every step)",
                  f"  today's loop with fp16 + GradScaler   "
                  f"{_fmt(f.get('recover_s_per_image_fp16_scaler'))}",
                  f"  with 2 IPC indices per forward        "
                  f"{_fmt(f.get('recover_s_per_image_ipc_per_forward_2'))}",
                  f"recover peak GPU memory, MiB            "
                  f"{_fmt(f.get('recover_peak_gpu_mib'), '.0f')}",
                  f"recover TFLOP/s, of the bf16 mm peak    {_fmt(f.get('recover_tflops'))}, "
                  f"{_fmt(f.get('recover_fraction_of_bf16_peak'), '.1%')}",
                  f"FADRM+ recover s/image (4 teachers)     "
                  f"{_fmt(f.get('recover_plus_s_per_image'))}   ({precision}; paper: "
                  f"{PAPER_PLUS_S_PER_IMAGE} s on one {PAPER_GPU})",
                  f"FADRM+ TFLOP/s, of the bf16 mm peak     "
                  f"{_fmt(f.get('recover_plus_tflops'))}, "
                  f"{_fmt(f.get('recover_plus_fraction_of_bf16_peak'), '.1%')}",
                  f"torch.mm peak TFLOP/s (bf16)            "
                  f"{_fmt(f.get('matmul_peak_tflops'))}",
                  f"relabel images/s                        "
                  f"{_fmt(f.get('relabel_images_per_s'))}",
                  f"  today's code with fp16 + GradScaler   "
                  f"{_fmt(f.get('relabel_images_per_s_fp16_scaler'))}",
                  f"  with 8 stored batches per forward     "
                  f"{_fmt(f.get('relabel_images_per_s_batches_per_forward_8'))}",
                  f"student images/s                        "
                  f"{_fmt(f.get('student_images_per_s'))}   ({at})",
                  f"student ms per step                     "
                  f"{_fmt(f.get('student_ms_per_step'))}",
                  f"  today's code with fp16 + GradScaler   "
                  f"{_fmt(f.get('student_ms_per_step_fp16_scaler'))}",
                  f"whole pipeline on the device, s         "
                  f"{_fmt(f.get('pipeline_seconds'), '.1f')}"]
    return "\n".join(lines)


def student_batch_words(result: dict) -> str:
    """The student's step as it runs: one stored batch as micro-batches (the BN batch), e.g.
    "stored batch 16 as 2 micro-batches of 8" (not "16 x 2", which reads as 32 images)."""
    batch, steps = result["batch"], result["accumulation_steps"]
    parts = min(steps, batch)
    size = -(-batch // parts)
    if parts == 1:
        return f"stored batch {batch} in one micro-batch"
    return f"stored batch {batch} as {parts} micro-batches of {size}" + (
        "" if batch % parts == 0 else " or fewer")


def summary_json(report: Report) -> dict:
    """What the end of the run prints on stdout as one JSON line (the figures and each
    part's status), so a job whose working directory is not kept still leaves them in its
    log; the whole record is ``OUT/gpu_check.json``."""
    gpus = (report.data.get("environment") or {}).get("gpus") or []
    return _clean({
        "schema": SCHEMA, "ok": report.data["ok"], "exit_code": report.data["exit_code"],
        "message": report.data["message"], "device": report.data["device"],
        "gpu": gpus[0]["name"] if gpus else None, "rehearsal": report.data["rehearsal"],
        "figures": report.data["figures"], "failures": report.data["failures"],
        "parts": {name: p["status"] for name, p in report.parts.items()},
        "report": str(report.path),
    })


_MEASURED = ("recover_s_per_image", "recover_plus_s_per_image", "matmul_peak_tflops",
             "relabel_images_per_s", "student_images_per_s", "pipeline_seconds")


def figures(report: Report) -> dict:
    """The headline figures of ``gpu_check.json``, taken from the parts' results."""
    def result(name: str) -> dict:
        part = report.parts.get(name) or {}
        return part.get("result") or {}

    rec, mm = result("speed.recover"), result("speed.matmul_peak")
    plus = result("speed.recover_plus")
    rel, stu = result("speed.relabel"), result("speed.student")

    def variant(part: dict, name: str, key: str):
        return (part.get(name) or {}).get(key)

    return {
        "recover_s_per_image": rec.get("seconds_per_image"),
        "paper_recover_s_per_image": PAPER_S_PER_IMAGE,
        "paper_gpu": PAPER_GPU,
        "recover_vs_paper": rec.get("vs_paper"),
        "recover_peak_gpu_mib": rec.get("peak_gpu_mib"),
        "recover_tflops": rec.get("achieved_tflops"),
        "recover_fraction_of_bf16_peak": rec.get("fraction_of_bf16_peak"),
        "matmul_peak_tflops": mm.get("peak_tflops"),
        "matmul_peak_dtype": mm.get("dtype"),
        "relabel_images_per_s": rel.get("images_per_s"),
        "student_images_per_s": stu.get("images_per_s"),
        "pipeline_seconds": result("pipeline.local_executor").get("seconds"),
        # Issue 23: the default precision (bf16) beside the paper's fp16 + GradScaler, and
        # more images per forward.
        "precision": rec.get("precision"),
        "recover_s_per_image_old_path": variant(rec, "old_path", "seconds_per_image"),
        "recover_s_per_image_fp16_scaler": variant(rec, "fp16_scaler", "seconds_per_image"),
        "recover_s_per_image_ipc_per_forward_2": variant(rec, "ipc_per_forward_2",
                                                         "seconds_per_image"),
        "relabel_images_per_s_fp16_scaler": variant(rel, "fp16_scaler", "images_per_s"),
        "relabel_images_per_s_batches_per_forward_8": variant(rel, "batches_per_forward_8",
                                                              "images_per_s"),
        "student_ms_per_step": stu.get("ms_per_step"),
        "student_ms_per_step_fp16_scaler": variant(stu, "fp16_scaler", "ms_per_step"),
        # FADRM+ (four teachers round-robin), at the default precision.
        "recover_plus_s_per_image": plus.get("seconds_per_image"),
        "paper_recover_plus_s_per_image": PAPER_PLUS_S_PER_IMAGE,
        "recover_plus_vs_paper": plus.get("vs_paper"),
        "recover_plus_tflops": plus.get("achieved_tflops"),
        "recover_plus_fraction_of_bf16_peak": plus.get("fraction_of_bf16_peak"),
    }
