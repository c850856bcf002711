"""The error types every layer shares.

:class:`InputError` is a problem with what the user gave us (the config, the data, teacher
weights): it is deterministic, so retrying cannot help. The CLI prints it as one line
(``error: ...``) and exits 2; the Ray executor fails its stage at once instead of letting
Ray Train restart the worker group. Every other exception is a failure of the run itself
(a lost node, an out-of-memory kill, a bug) and is retried where Ray Train can.
"""

from __future__ import annotations

__all__ = ["InputError", "DeviceError", "MissingDependencyError", "EXIT_OK", "EXIT_WORK_TO_DO",
           "EXIT_BAD_INPUT", "EXIT_RUN_FAILED"]

# Exit codes of every `fadrm` command and of `python -m ray_jobs.distill` (README "Exit codes").
EXIT_OK = 0
"""Done, or already up to date."""
EXIT_WORK_TO_DO = 1
"""`fadrm status` only: some stage is not done."""
EXIT_BAD_INPUT = 2
"""Bad input (config, data, weights, storage location): nothing was run."""
EXIT_RUN_FAILED = 3
"""A run that started and then failed (finished units are kept; re-run to resume)."""


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
