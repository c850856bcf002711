"""Content-addressed stage keys and "what is stale?".

Each stage's output lives under ``<output>/<stage>/<key>/`` where ``key`` hashes everything
the output depends on (its config section, upstream keys, teacher fingerprints, data
fingerprint, package version). An unchanged stage is therefore found complete and never
recomputed, and a changed teacher changes exactly the keys of the stages that used it.

The run's ``manifest.json`` records the components of every key, so ``status`` can say
*why* a stage is stale: which component changed since the last completed run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["digest", "StageKey", "StageStatus", "RunStatus", "diff_components",
           "changed_values"]


def digest(obj: Any, length: int = 16) -> str:
    """Stable hex digest of plain data (dict key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass
class StageKey:
    """A stage's identity: its name and the components its key hashes."""

    stage: str
    components: dict[str, Any]

    @property
    def key(self) -> str:
        return digest({"stage": self.stage, **self.components})


def changed_values(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key path, old value, new value)`` of every leaf that differs."""
    changes = []
    for name in sorted(set(old) | set(new)):
        path = f"{prefix}{name}"
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changes.extend(changed_values(a, b, path + "."))
        else:
            changes.append((path, a, b))
    return changes


def diff_components(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable list of what differs between two component dicts."""
    return [f"{path}: {_short(a)} -> {_short(b)}" for path, a, b in changed_values(old, new,
                                                                                  prefix)]


def short(value: Any) -> str:
    """``value`` as JSON, cut to 40 characters."""
    return _short(value)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class StageStatus:
    name: str
    key: str
    state: str
    """'done', 'partial', 'missing' (never run), 'stale' (inputs changed since last run) or
    'damaged' (a complete output no longer matches its checksum sidecar)."""
    done_units: int
    total_units: int
    reason: str = ""


@dataclass
class RunStatus:
    stages: list[StageStatus]
    fingerprints: dict[str, str] = field(default_factory=dict)
    report: str = "missing"
    """This config's report: 'current' (its manifest names the current stage keys),
    'missing' (never written, or a run died before its manifest, written last) or
    'outdated' (written for other stage keys)."""
    report_reason: str = ""

    @property
    def up_to_date(self) -> bool:
        # Every stage done is not enough: a run that died after evaluate but before its
        # report was written must still be finished (by a run that writes only the report).
        return self.report == "current" and all(s.state == "done" for s in self.stages)

