"""Issue 27, item 1: a run that dies after its last stage but before its report is written
is not finished. `fadrm status` says the report is missing (exit 1), `fadrm watch` submits
instead of skipping, and the next run writes only the report (no stage recomputed)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fadrm import storage
from fadrm.cli import main
from fadrm.config import load_config
from fadrm.errors import EXIT_OK, EXIT_RUN_FAILED, EXIT_WORK_TO_DO
from fadrm.plan import RunPlan
from fadrm.runner import run_pipeline
from fadrm.watch.decision import SKIP_UP_TO_DATE, SUBMIT, decide
from tests.test_cli import micro_config
from tests.test_pipeline import RecordingExecutor

REPO = Path(__file__).resolve().parents[1]


def _report(cfg) -> Path:
    return Path(RunPlan(cfg).run_dir)


def _assert_report_missing_then_rerun_writes_only_it(path: Path, capsys) -> None:
    cfg = load_config(path)
    assert not (_report(cfg) / "manifest.json").exists()
    plan = RunPlan(cfg)
    status = plan.status()
    assert all(s.state == "done" for s in status.stages)  # every stage finished...
    assert status.report == "missing" and not status.up_to_date  # ...but no report
    capsys.readouterr()
    assert main(["status", str(path)]) == EXIT_WORK_TO_DO
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("work to do; report missing: ") and "`fadrm run` writes it" in last

    decision = decide(status, [], config_name=cfg.name)
    assert decision.action == SUBMIT and decision.action != SKIP_UP_TO_DATE
    assert "report: missing" in decision.reason

    rerun = RecordingExecutor()
    run_pipeline(cfg, rerun, show_progress=False)
    assert rerun.ran == []  # only the report was written
    manifest = json.loads((_report(cfg) / "manifest.json").read_text())
    assert set(manifest["cached_stages"]) == {s.label for s in plan.stages}
    assert (_report(cfg) / "metrics.json").exists() and (_report(cfg) / "grid.png").exists()
    assert RunPlan(cfg).status().up_to_date
    assert main(["status", str(path)]) == EXIT_OK


def test_a_report_write_that_fails_leaves_the_run_unfinished(tmp_path, monkeypatch, capsys):
    path = micro_config(tmp_path)
    real = storage.write_bytes_atomic

    def disk_full_at_metrics(uri, data, *args, **kwargs):
        if str(uri).endswith("metrics.json") and "/runs/" in str(uri):
            raise OSError(28, "No space left on device", str(uri))
        return real(uri, data, *args, **kwargs)

    monkeypatch.setattr(storage, "write_bytes_atomic", disk_full_at_metrics)
    assert main(["run", str(path), "--executor", "local", "--no-progress"]) == EXIT_RUN_FAILED
    monkeypatch.setattr(storage, "write_bytes_atomic", real)
    _assert_report_missing_then_rerun_writes_only_it(path, capsys)


_KILL_AT_METRICS = """
import os, signal, sys
from fadrm import storage
real = storage.write_bytes_atomic
def killed(uri, data, *args, **kwargs):
    if str(uri).endswith("metrics.json") and "/runs/" in str(uri):
        os.kill(os.getpid(), signal.SIGKILL)  # a pod killed in the report window
    return real(uri, data, *args, **kwargs)
storage.write_bytes_atomic = killed
from fadrm.cli import main
sys.exit(main(["run", sys.argv[1], "--executor", "local", "--no-progress"]))
"""


def test_a_run_killed_while_writing_its_report_is_not_called_finished(tmp_path, capsys):
    path = micro_config(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_METRICS, str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (_report(load_config(path)) / "grid.png").exists()  # it died inside the report
    _assert_report_missing_then_rerun_writes_only_it(path, capsys)


def test_a_report_of_other_stage_keys_is_outdated(tmp_path, capsys):
    path = micro_config(tmp_path)
    assert main(["run", str(path), "--executor", "local", "--no-progress"]) == EXIT_OK
    cfg = load_config(path)
    manifest_path = _report(cfg) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["stages"]["evaluate"]["key"] = "0" * 16  # as if written for other inputs
    manifest_path.write_text(json.dumps(manifest))
    status = RunPlan(cfg).status()
    assert status.report == "outdated" and "evaluate" in status.report_reason
    assert not status.up_to_date
    capsys.readouterr()
    assert main(["status", str(path)]) == EXIT_WORK_TO_DO
    assert "report outdated" in capsys.readouterr().out
    rerun = RecordingExecutor()
    run_pipeline(cfg, rerun, show_progress=False)
    assert rerun.ran == [] and RunPlan(cfg).status().up_to_date
