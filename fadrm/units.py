"""Typed work-unit ids of the image stages, with their string form (part of shard names).

``b003`` is class block 3 (a select unit); ``b003-i0004`` is IPC index 4 of class block 3
(a recover unit; with ``recover.ipc_per_forward: G`` the unit of indices 4 to 4 + G - 1);
``e0015-0029`` is student epochs 15 to 29 (a relabel unit).
``str(X.parse(s)) == s`` for every id a stage produces, so shard names, and with them the
bytes and keys, are those of the string ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["UnitId", "EpochUnit"]

_PATTERN = re.compile(r"b(\d{3,})(?:-i(\d{4,}))?")
_EPOCHS = re.compile(r"e(\d{4,})-(\d{4,})")


@dataclass(frozen=True, order=True)
class UnitId:
    """A class block, and for recover units the IPC index within it."""

    block: int
    index: int | None = None

    @classmethod
    def parse(cls, text: str) -> "UnitId":
        match = _PATTERN.fullmatch(text)
        if match is None:
            raise ValueError(f"not an image unit id (bNNN or bNNN-iNNNN): {text!r}")
        block, index = match.groups()
        return cls(int(block), None if index is None else int(index))

    def __str__(self) -> str:
        if self.index is None:
            return f"b{self.block:03d}"
        return f"b{self.block:03d}-i{self.index:04d}"


@dataclass(frozen=True, order=True)
class EpochUnit:
    """A block of student epochs, ``first`` to ``last`` inclusive."""

    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> "EpochUnit":
        match = _EPOCHS.fullmatch(text)
        if match is None:
            raise ValueError(f"not an epoch unit id (eNNNN-NNNN): {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"e{self.first:04d}-{self.last:04d}"

    @property
    def epochs(self) -> range:
        return range(self.first, self.last + 1)
