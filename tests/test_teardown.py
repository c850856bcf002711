"""Leaving a Ray run is bounded: a ``ray.shutdown()`` that hangs does not hold the driver,
and the processes of the driver's Ray instance are killed, its other children are not."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray

from ray_jobs import teardown

RAY_HOME = os.path.dirname(os.path.abspath(ray.__file__))

# A stand-in for a Ray program (its command line names a file of the ray package, as the
# raylet's and the dashboard's do) that starts a worker below it, as the raylet does.
FAKE_RAY = ("import subprocess, sys, time; "
            "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print(w.pid, flush=True); time.sleep(120)")


def _alive(pid: int) -> bool:
    return teardown._process_table_entry(pid) is not None


def test_a_hanging_shutdown_is_cut_short_and_ray_processes_are_killed(monkeypatch, caplog):
    fake_ray = subprocess.Popen([sys.executable, "-c", FAKE_RAY, f"{RAY_HOME}/fake.py"],
                                stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    release = threading.Event()
    monkeypatch.setattr(ray, "shutdown", lambda: release.wait(60))
    monkeypatch.setattr(sys, "excepthook", ray._private.worker.custom_excepthook)
    runner = threading.Thread(target=release.wait, args=(60,), daemon=True)
    runner.start()
    try:
        worker = int(fake_ray.stdout.readline())
        found = teardown.ray_processes()
        assert set(found) == {fake_ray.pid, worker}  # not `other`: not a Ray program

        start = time.monotonic()
        teardown.abandon(runner, bound=0.5)
        took = time.monotonic() - start

        assert took < 0.5 + teardown.AFTER_KILL_S + teardown.RUNNER_S + 1, took
        assert fake_ray.wait(timeout=5) == -9  # SIGKILL, not a graceful end
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)  # (the kill is sent; the kernel ends it asynchronously)
        assert not _alive(worker), "the worker below the Ray program survived"
        assert other.poll() is None, "a child that is not Ray's was killed"
        assert "did not finish within" in caplog.text
        assert sys.excepthook is sys.__excepthook__  # Ray's would wait on the dead GCS
    finally:
        release.set()
        for proc in (fake_ray, other):
            proc.kill()
            proc.wait()


def test_a_reused_pid_is_never_killed():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        started = teardown._process_table_entry(proc.pid)[1]
        teardown.kill({proc.pid: started + 1})  # the same pid, another process's start time
        assert proc.poll() is None
        teardown.kill({proc.pid: started})
        assert proc.wait(timeout=5) == -9
    finally:
        proc.kill()
        proc.wait()

