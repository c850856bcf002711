"""The config's error and the value checks every section's ``validate`` shares."""

from __future__ import annotations

import re

from fadrm.errors import InputError


class ConfigError(InputError):
    """A configuration problem; the message starts with the key path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)



_SHA256 = re.compile(r"[0-9a-f]{64}")


def _positive(value: float, path: str) -> None:
    if not value > 0:
        raise ConfigError(path, f"must be > 0, got {value}")


def _unit_interval(value: float, path: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(path, f"must be in [0, 1], got {value}")


def _scale_range(value: list[float], path: str) -> None:
    if len(value) != 2 or not 0 < value[0] <= value[1] <= 1:
        raise ConfigError(path, f"must be [low, high] with 0 < low <= high <= 1, got {value}")
