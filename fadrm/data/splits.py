"""Deterministic splits and subsets: items ranked by a seeded hash of their names."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _rank(keys: Sequence[str], seed: int) -> list[int]:
    """Indices of ``keys`` in a seeded pseudo-random order.

    Each key's position depends only on the key and the seed (not on the other keys), so a
    split stays put when unrelated files are added or removed.
    """
    prefix = f"{seed}\0".encode()
    digests = [hashlib.sha256(prefix + k.encode()).digest() for k in keys]
    return sorted(range(len(keys)), key=digests.__getitem__)


def _order_per_class(labels: Sequence[int], keys: Sequence[str], seed: int) -> dict[int, list[int]]:
    """For every label, its item indices in seeded rank order."""
    out: dict[int, list[int]] = {}
    for i in _rank(keys, seed):
        out.setdefault(int(labels[i]), []).append(i)
    return out


def _balanced_take(per_class: dict[int, list[int]], n: int) -> list[int]:
    """``n`` items taken round-robin over the classes, so small subsets stay balanced."""
    order = sorted(
        ((pos, label, i) for label, idx in per_class.items() for pos, i in enumerate(idx)),
    )
    return sorted(i for _, _, i in order[:n])


def _select(labels: Sequence[int], keys: Sequence[str], seed: int,
            max_per_class: int | None, max_total: int | None) -> list[int]:
    """Sorted indices of a deterministic subset: <= max_per_class per class, <= max_total."""
    if max_per_class is None and max_total is None:
        return list(range(len(labels)))
    per_class = _order_per_class(labels, keys, seed)
    if max_per_class is not None:
        per_class = {c: idx[:max_per_class] for c, idx in per_class.items()}
    total = sum(len(v) for v in per_class.values())
    return _balanced_take(per_class, total if max_total is None else max_total)
