"""Typed work-unit ids of the image stages, with their string form (part of shard names).

``b003`` is class block 3 (a select unit); ``b003-i0004`` is IPC index 4 of class block 3
(a recover unit). ``str(UnitId.parse(s)) == s`` for every id a stage produces, so shard
names, and with them the bytes and keys, are those of the string ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["UnitId"]

_PATTERN = re.compile(r"b(\d{3,})(?:-i(\d{4,}))?")


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
