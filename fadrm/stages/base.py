"""What every stage is: a content key, deterministic work units, a worker-side ``setup`` /
``run_unit`` pair, and the per-unit seed.

Executors (in-process in :mod:`fadrm.executors`, Ray Train in ``ray_jobs``) only decide
*where* units run; what a unit computes depends on (run seed, unit id) and what its key
holds, so its bytes do not depend on the worker, the executor, the number of workers or
retries. Stages whose ``collective`` flag is set (teacher and student training) run on
``execution.train_workers`` ranks (DDP when several; the number is in their keys then);
the others are pulled unit by unit. Both executors compute with
``execution.threads_per_worker`` intra-op threads (in the keys when not 1), and claim each
unit with a lease (:mod:`fadrm.leases`) so two runs on one output compute it once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from fadrm import storage
from fadrm.formats import shards
from fadrm.config import RunConfig
from fadrm.lineage import StageKey

__all__ = ["StagePlan", "WorkerContext", "Stage", "unit_seed", "teacher_model", "load_teacher",
           "json_bytes"]


def unit_seed(run_seed: int, stage: str, unit: str) -> int:
    """A 31-bit seed derived from (run seed, stage, unit id) only."""
    h = hashlib.sha256(f"{run_seed}/{stage}/{unit}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class StagePlan(Protocol):
    """What a stage reads of the run's plan (:class:`fadrm.plan.RunPlan` is one): the config,
    the data, the class blocks, the teachers' weights and the stages it reads from."""

    cfg: RunConfig
    source: Any  # fadrm.datasource.DataSource
    num_classes: int
    num_blocks: int
    block_size: int
    select: Any  # the select stage, None when the method has none
    relabel: Any
    images_stage: "Stage"

    def block_classes(self, block: int) -> list[int]: ...

    def teacher_uri(self, index: int) -> str | None: ...

    def teacher_bytes(self, index: int) -> bytes | None: ...

    def teacher_sha256(self, index: int) -> str | None: ...

    def squeeze_skipped(self) -> list[dict]: ...


@dataclass
class WorkerContext:
    """What a stage needs to know about the worker it runs on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[int, int], None] = lambda done, total: None
    """Progress inside the current unit (steps done, steps total)."""


class Stage:
    """A stage of the run: a key, work units, and how a worker computes one unit."""

    name: str = ""
    collective: bool = False

    def __init__(self, plan: StagePlan, key: StageKey):
        self.plan = plan  # the run-wide inputs: seed, ipc, data, teachers, earlier stages
        self.key = key

    @property
    def cfg(self) -> RunConfig:
        return self.plan.cfg

    @property
    def dir(self) -> str:
        return storage.join(self.cfg.output, self.name, self.key.key)

    @property
    def label(self) -> str:
        """The stage's name in reports and status (``squeeze[i]`` per teacher)."""
        return self.name

    def units(self) -> list[str]:
        raise NotImplementedError

    def unit_uri(self, unit: str) -> str:
        raise NotImplementedError

    def is_done(self, unit: str) -> bool:
        return shards.is_complete(self.unit_uri(unit))

    def pending(self) -> list[str]:
        return [u for u in self.units() if not self.is_done(u)]

    # The time this stage's output took to compute, kept beside it, so a later run that
    # reuses the output reports it as cached with its original time (not as 0 s), and a run
    # that resumes it reports the whole stage's time (not only its own part).
    @property
    def timing_uri(self) -> str:
        return storage.join(self.dir, "timing.json")

    def _timing(self) -> dict:
        try:
            return shards.read_json(self.timing_uri)
        except (FileNotFoundError, ValueError):
            return {}

    def recorded_seconds(self) -> float | None:
        """Seconds the runs that computed this output spent on it: the runs that ended
        (finished, stopped or failed), plus those that were killed, up to their last
        finished unit; None when unknown."""
        timing = self._timing()
        if "seconds" not in timing and not timing.get("open"):
            return None
        return round(timing.get("seconds", 0.0) + sum(timing.get("open", {}).values()), 2)

    def record_seconds(self, seconds: float, units: int, attempt: str | None = None) -> None:
        """Add a run's ``seconds`` for ``units`` units (a resumed or repaired stage adds up);
        ``attempt``: that run's id, whose running time (:meth:`checkpoint_seconds`) this
        replaces."""
        timing = self._timing()
        running = timing.get("open", {})
        running.pop(attempt, None)
        shards.write_json(self.timing_uri, {
            "seconds": round(timing.get("seconds", 0.0) + seconds, 2), "last_units": units,
            "open": running,
            "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})

    def checkpoint_seconds(self, attempt: str, seconds: float) -> None:
        """The running ``attempt`` has spent ``seconds`` so far (said as each unit finishes):
        kept until it ends, and counted if it never does (a SIGKILL, a lost driver)."""
        timing = self._timing()
        timing.setdefault("open", {})[attempt] = round(seconds, 2)
        shards.write_json(self.timing_uri, timing)

    def setup(self, ctx: WorkerContext) -> Any:
        """Per-worker state loaded once (data, teachers)."""
        return None

    def run_unit(self, state: Any, unit: str, ctx: WorkerContext) -> None:
        raise NotImplementedError

    def outputs(self) -> list[dict]:
        """Sidecar info of every completed unit (for the manifest)."""
        rows = []
        for unit in self.units():
            info = shards.shard_info(self.unit_uri(unit))
            if info is not None:
                rows.append({"stage": self.name, "uri": self.unit_uri(unit), **info})
        return rows


def teacher_model(plan: StagePlan, index: int):
    from fadrm.models import create_model

    t = plan.cfg.teachers[index]
    d = plan.cfg.data
    return create_model(
        t.model, plan.num_classes, in_chans=d.channels, image_size=d.resolution,
        small_stem=t.small_stem, pretrained=t.pretrained,
    )


def load_teacher(plan: StagePlan, index: int, device: torch.device) -> torch.nn.Module:
    from fadrm.models import load_weights

    model = teacher_model(plan, index)
    uri = plan.teacher_uri(index)
    if uri is not None:
        # The plan reads the bytes once per process, so the next stage of a shared worker
        # group (recover, then relabel, then evaluate) loads from memory.
        digest = load_weights(model, uri, plan.teacher_bytes(index))  # returns their sha256
        expected = plan.teacher_sha256(index)
        if expected is not None and digest != expected:
            raise shards.ShardCorruptError(
                f"{uri}: sha256 {digest[:12]}... does not match recorded {expected[:12]}...",
                uri)  # repaired by the runner only when it is a stage's output (squeeze)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model




def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()
