"""Leave a Ray run at once (Ctrl-C, SIGTERM, a wait that ran out), whatever state Ray is in.

Nothing of the run is worth waiting for then: finished units are in storage already (each
written atomically) and an unfinished one is computed again by the next run. Yet
``ray.shutdown()`` is a graceful teardown of unbounded length. Measured on 2 cores: 0.25 s
to disconnect the driver, then, one process after the other, SIGTERM and up to 1 s of grace,
SIGKILL and up to 1 s more (Ray's autoscaler monitor uses its full second every time); with
the raylet already gone, the disconnect alone waits 5 s on RPC timeouts; and the processes
that the dashboard forks can outlive the driver. Under a full test run on a loaded machine,
one Ctrl-C took 53 s to end the process (where exactly was not caught), so no step of the
way out waits without a bound.

So :func:`abandon` gives ``ray.shutdown()`` a bound, in a thread of its own, then SIGKILLs
what is left of the processes that this driver started (an embedded instance: raylet, GCS,
dashboard, monitor, and below them the workers). Connected to a cluster, the driver started
none: the bound alone applies, and the job ends with the driver's connection.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import ray

log = logging.getLogger(__name__)

SHUTDOWN_S = 3.0
"""How long ``ray.shutdown()`` may take before the driver kills its Ray processes."""
AFTER_KILL_S = 1.0
"""How long the shutdown thread may take to notice that its processes are gone."""
RUNNER_S = 2.0
"""How long the thread of ``trainer.fit()`` may take to return once Ray is down."""


def abandon(runner: threading.Thread, bound: float = SHUTDOWN_S) -> None:
    """Disconnect from Ray (which ends this driver's job, and with it Ray Train's controller
    and workers) within ``bound`` seconds, then kill the Ray processes that this process
    started and that are still there. Never raises: the caller is on its way out with an
    exception of its own (the Ctrl-C)."""
    started = ray_processes()  # before the shutdown: afterwards the tree is broken up
    _forget_ray_excepthook()
    closer = threading.Thread(target=_shutdown, name="fadrm-ray-shutdown", daemon=True)
    closer.start()
    closer.join(bound)
    kill(started)
    closer.join(AFTER_KILL_S)
    if closer.is_alive():
        # Ray's own shutdown at interpreter exit would wait for this one (they share a lock).
        atexit.unregister(ray.shutdown)
        log.warning("Ray's shutdown did not finish within %.0f s; its processes were killed",
                    bound + AFTER_KILL_S)
    runner.join(RUNNER_S)


def _forget_ray_excepthook() -> None:
    """Put back Python's own ``sys.excepthook``. Ray's (set when ``ray`` is imported) first
    reports an uncaught exception to the GCS, which waits without end once the GCS is gone:
    seen when the driver's stderr reader had gone (a BrokenPipeError escaping ``main``), the
    process hung in that hook for minutes after its Ray instance was down."""
    if getattr(sys.excepthook, "__module__", "").startswith("ray."):
        sys.excepthook = sys.__excepthook__


def _shutdown() -> None:
    try:
        ray.shutdown()
    except Exception as exc:  # noqa: BLE001 - leaving anyway; a traceback would only alarm
        log.debug("ray.shutdown() failed while abandoning the run: %r", exc)


# --------------------------------------------------------------------------- processes

def ray_processes(parent: int | None = None) -> dict[int, int]:
    """The processes of the Ray instance that ``parent`` (default: this process) started,
    each pid with its start time (so that a pid reused later is never killed): its children
    that run Ray's own programs (raylet, GCS, dashboard, ...), and everything below them.
    Other children (a test's helper server, say) are left alone. Empty where there is no
    ``/proc`` or no embedded instance."""
    table = _process_table()
    home = os.path.dirname(os.path.abspath(ray.__file__))
    parent = os.getpid() if parent is None else parent
    roots = {pid for pid, (ppid, _) in table.items()
             if ppid == parent and home in _cmdline(pid)}
    return {pid: table[pid][1] for pid in roots | descendants(roots, table)}


def descendants(roots: set[int], table: dict[int, tuple[int, int]] | None = None) -> set[int]:
    """Every process below ``roots`` in ``table`` (:func:`_process_table`, read now by
    default), the roots themselves not included."""
    table = _process_table() if table is None else table
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def kill(processes: dict[int, int]) -> None:
    """SIGKILL each of ``processes`` (pid -> start time) that is still the same process."""
    for pid, started in processes.items():
        now = _process_table_entry(pid)
        if now is None or now[1] != started:
            continue  # gone (or the pid is another process's by now)
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks), from ``/proc``."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        row = _process_table_entry(int(entry.name))
        if row is not None:
            table[int(entry.name)] = row
    return table


def _process_table_entry(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process; None for one gone or a zombie."""
    try:
        # After the command name (which may hold spaces and parentheses): field 3 on.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""
