"""The error types every layer shares.

:class:`InputError` is a problem with what the user gave us (the config, the data, teacher
weights): it is deterministic, so retrying cannot help. The CLI prints it as one line
(``error: ...``) and exits 2; the Ray executor fails its stage at once instead of letting
Ray Train restart the worker group. Every other exception is a failure of the run itself
(a lost node, an out-of-memory kill, a bug) and is retried where Ray Train can.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["InputError", "DeviceError", "MissingDependencyError", "Terminated",
           "stop_on_sigterm", "EXIT_OK", "EXIT_WORK_TO_DO", "EXIT_BAD_INPUT", "EXIT_RUN_FAILED",
           "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

# Exit codes of every `fadrm` command and of `python -m ray_jobs.distill` (docs/CLI.md, "Exit codes").
EXIT_OK = 0
"""Done, or already up to date."""
EXIT_WORK_TO_DO = 1
"""`fadrm status` only: some stage is not done."""
EXIT_BAD_INPUT = 2
"""Bad input (config, data, weights, storage location): nothing was run."""
EXIT_RUN_FAILED = 3
"""A run that started and then failed (finished units are kept; re-run to resume)."""
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C (SIGINT); finished units are kept."""
EXIT_TERMINATED = 143
"""Stopped by SIGTERM (128 + 15: Kubernetes stopping a pod, `ray job stop`, `kill`);
finished units are kept."""


class InputError(ValueError):
    """Bad user input; the message names the key path, file or class, and the fix."""


class DeviceError(InputError, RuntimeError):
    """The configured device is not there (e.g. ``execution.device: cuda`` without a GPU)."""


class MissingDependencyError(InputError, ImportError):
    """An optional package a feature needs is not installed (the message names it)."""

    def __init__(self, package: str, feature: str, install: str | None = None):
        self.package = package
        hint = install or f"pip install {package}"
        super().__init__(f"{feature} needs the Python package {package!r}, which is not "
                         f"installed ({hint})")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as Ctrl-C stops (every ``except KeyboardInterrupt`` path, e.g.
    the Ray executor shutting its workers down, applies), but exit 143, not 130."""


def _raise_terminated(signum, frame) -> None:
    # Once only: a second SIGTERM must not interrupt the clean-up the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere
    this does nothing); the previous handler is put back afterwards.

    ``ray.init`` installs a SIGTERM handler of its own (exit 15, or exit 1 after killing its
    processes); the Ray executor puts back the handler that was there before it connected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
