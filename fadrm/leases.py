"""Unit leases: two runs of one config on one output compute each unit once.

Before a worker computes a unit it claims a lease on it in the output store, beside the
unit's output: ``<stage dir>/<unit>.lease.<generation>``, a small JSON file naming the
holder and when the claim expires. The claim is an exclusive create (local: a hard link
that fails when the name exists; S3: a PUT with ``If-None-Match: *``), so of two runs
that try at once exactly one wins. The holder renews the expiry while it works (a
heartbeat thread) and deletes the lease once the unit's output is written.

A run that finds a unit leased by another live holder leaves it for now and waits: the
unit's output appears, or the lease expires (its holder died: a killed pod, a lost node),
and then the next generation (``generation + 1``, again an exclusive create, so again one
winner) takes it over. A lease of a process of this machine that is no longer running
counts as expired at once, so a killed run re-run on the same machine resumes at once.

Bytes never depend on leases: a unit's output is write-once (:mod:`fadrm.formats.shards`)
and the same whoever computes it; leases only keep the second run from doing it again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from fadrm import storage

__all__ = ["Lease", "Outcome", "claim", "attempt", "claim_when_free", "new_holder", "lease_names",
           "LEASE_S", "LeaseUnsupported"]

log = logging.getLogger("fadrm.leases")

LEASE_S = 120.0
"""How long a claim holds without renewal; the holder renews it every third of that."""
POLL_S = 2.0
"""How often a run waiting for another run's units looks at the store again."""


class LeaseUnsupported(RuntimeError):
    """The output store cannot create a file only when it is absent (no conditional PUT)."""


class Outcome(Enum):
    COMPUTED = "computed"  # computed here
    DONE = "done"  # already complete (another run, or an earlier one, wrote it)
    HELD = "held"  # another live holder is computing it now


def new_holder() -> str:
    """A name for this run's claims: host, process and a random part (two runs in one
    process, as in tests, are two holders)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _lease_uri(stage_dir: str, unit: str, generation: int) -> str:
    return storage.join(stage_dir, f"{unit}.lease.{generation}")


def lease_names(stage_dir: str, unit: str) -> dict[int, str]:
    """generation -> URI of the lease files of ``unit`` now in the store."""
    prefix = f"{unit}.lease."
    out = {}
    for name in storage.listdir(stage_dir):
        tail = name[len(prefix):] if name.startswith(prefix) else ""
        if tail.isdigit():
            out[int(tail)] = storage.join(stage_dir, name)
    return out


def _alive_here(holder: str) -> bool | None:
    """Whether the process that holds a lease still runs, when it ran on this machine
    (None: another machine's; only its expiry tells)."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _expired(info: dict, now: float) -> bool:
    if _alive_here(info.get("holder", "")) is False:
        return True
    return float(info.get("expires", 0)) <= now


def _body(holder: str, ttl: float) -> bytes:
    now = time.time()
    return json.dumps({"holder": holder, "claimed": now, "expires": now + ttl}).encode()


@dataclass
class Lease:
    """A claim this run holds on one unit, renewed until :meth:`release`."""

    uri: str
    holder: str
    ttl: float
    older: list[str] = field(default_factory=list)  # earlier generations, expired
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Lease:
        self._thread = threading.Thread(target=self._renew, name="fadrm-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                storage.write_bytes_atomic(self.uri, _body(self.holder, self.ttl))
            except Exception as exc:  # noqa: BLE001 - the next renewal tries again
                log.warning("lease %s: renewal failed (%s); trying again", self.uri, exc)

    def release(self) -> None:
        """Stop renewing; delete this claim and the expired ones it replaced."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for uri in [self.uri, *self.older]:
            try:
                storage.delete(uri)
            except FileNotFoundError:
                pass


def claim(stage_dir: str, unit: str, holder: str, ttl: float = LEASE_S) -> Lease | None:
    """Claim ``unit``; None when another live holder has it (or won the claim just now)."""
    for _ in range(3):  # a lease deleted between listing and reading: look again
        found = lease_names(stage_dir, unit)
        generation = max(found, default=0)
        if generation:
            try:
                info = json.loads(storage.read_bytes(found[generation]))
            except FileNotFoundError:
                continue  # released just now
            except ValueError:
                info = {}  # unreadable: treated as expired
            if not _expired(info, time.time()):
                return None
        uri = _lease_uri(stage_dir, unit, generation + 1)
        if not storage.create_exclusive(uri, _body(holder, ttl)):
            return None  # another run claimed the same generation first
        if generation:
            log.info("%s: took over the expired lease of %s", uri, info.get("holder", "?"))
        return Lease(uri, holder, ttl, sorted(found.values())).start()
    return None


def attempt(stage_dir: str, unit: str, holder: str, is_done: Callable[[], bool],
            compute: Callable[[], None], ttl: float = LEASE_S) -> Outcome:
    """Compute ``unit`` under a lease unless it is complete or another live holder has it."""
    if is_done():
        return Outcome.DONE
    lease = claim(stage_dir, unit, holder, ttl)
    if lease is None:
        return Outcome.HELD
    try:
        if is_done():  # completed by another run between the check and the claim
            return Outcome.DONE
        compute()
        return Outcome.COMPUTED
    finally:
        lease.release()


def claim_when_free(stage_dir: str, unit: str, holder: str, is_done: Callable[[], bool],
                    ttl: float = LEASE_S, poll_s: float = POLL_S) -> Lease | None:
    """Wait until ``unit`` is complete (None) or claimed here (the lease): for a stage
    whose workers do one unit together (teacher or student training)."""
    told = False
    while not is_done():
        lease = claim(stage_dir, unit, holder, ttl)
        if lease is not None:
            if not is_done():
                return lease
            lease.release()
            return None
        if not told:
            log.info("%s/%s: another run on this output is computing it (leased); waiting "
                     "for its output", stage_dir, unit)
            told = True
        threading.Event().wait(poll_s)  # the other run's output, or its lease's expiry
    return None
