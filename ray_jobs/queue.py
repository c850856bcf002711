"""A stage's unit queue: the pending units of one stage, held by an async Ray actor on the
driver's node and handed out one at a time to the Ray Train workers (see
:mod:`ray_jobs.executor`)."""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

import ray

__all__ = ["QueueState", "UnitQueue"]


class QueueState(NamedTuple):
    """What a stage's queue reports to the driver and to workers."""

    done: float  # units finished, plus the fractions of those in flight
    started: bool  # a worker group has entered
    failure: str | None  # a recorded bad input (no unit is handed out after it)
    finished: int  # units whose outputs are in storage
    corrupt_uri: str | None = None  # the failure is this damaged output (the run repairs it)


@ray.remote(num_cpus=0)
class UnitQueue:
    """Pending units of one stage, handed out one at a time (an async actor)."""

    def __init__(self, units: list[str]):
        import asyncio

        self.pending = deque(units)
        self.not_before: dict[str, float] = {}  # pending unit -> when to hand it out again
        self.in_flight: dict[str, str] = {}  # unit -> generation that took it
        self.inner: dict[str, float] = {}  # unit -> fraction done
        self.done: set[str] = set()
        self.generation: str | None = None
        self.failure: str | None = None  # a bad-input error a worker met (not retried)
        self.corrupt_uri: str | None = None  # ...or the damaged output it met
        self.changed = asyncio.Condition()

    async def enter(self, generation: str) -> None:
        if generation == self.generation:
            return
        # A new worker group: whatever the previous one had in flight is orphaned.
        for unit in sorted(self.in_flight, reverse=True):
            self.pending.appendleft(unit)
        self.in_flight.clear()
        self.inner.clear()
        self.generation = generation

    async def next(self, generation: str) -> str | None:
        """The next unit to compute; None when there is none left. A unit that another run
        holds (leased, :meth:`defer`) is handed out again only once its wait is over."""
        import asyncio

        while True:
            if generation != self.generation or not self.pending or self.failure is not None:
                return None
            now = time.monotonic()
            for unit in self.pending:
                if self.not_before.get(unit, 0.0) <= now:
                    self.pending.remove(unit)
                    self.not_before.pop(unit, None)
                    self.in_flight[unit] = generation
                    return unit
            await asyncio.sleep(min(self.not_before[u] for u in self.pending) - now)

    async def defer(self, unit: str, seconds: float) -> None:
        """``unit`` is leased by another run on the same output: back to the queue, to be
        looked at again after ``seconds`` (done by then, or its lease expired)."""
        if self.in_flight.pop(unit, None) is not None:
            self.inner.pop(unit, None)
            self.pending.append(unit)
            self.not_before[unit] = time.monotonic() + seconds

    async def report(self, unit: str, fraction: float) -> None:
        if unit in self.in_flight:
            self.inner[unit] = fraction

    async def finish(self, unit: str) -> None:
        self.in_flight.pop(unit, None)
        self.inner.pop(unit, None)
        self.done.add(unit)
        async with self.changed:
            self.changed.notify_all()

    async def fail(self, message: str, corrupt_uri: str | None = None) -> None:
        """Record a deterministic failure, a bad input or (``corrupt_uri``) a damaged output
        that the driver's run regenerates: no unit is handed out after it."""
        if self.failure is None:
            self.failure, self.corrupt_uri = message, corrupt_uri
        async with self.changed:
            self.changed.notify_all()

    async def todo(self) -> list[str]:
        """Units not finished yet (pending, then any in flight), in the stage's order."""
        return [*self.pending, *sorted(self.in_flight)]

    async def state(self) -> QueueState:
        done = len(self.done) + sum(self.inner.values())
        return QueueState(done, self.generation is not None, self.failure, len(self.done),
                          self.corrupt_uri)

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def wait_done(self, count: int) -> list[str]:
        """Block until at least ``count`` units are finished (or a worker recorded a
        failure); returns the finished ones."""
        async with self.changed:
            await self.changed.wait_for(
                lambda: len(self.done) >= count or self.failure is not None)
        return sorted(self.done)
