"""Keep one known, harmless Ray line off the driver's console; every other line passes.

The line (once per stage, before this filter)::

    (TrainController pid=4078) [... E 4078 4110] core_worker.cc:2465: Actor with class name:
    'PreemptionWatcher' and ID: '...' has constructor arguments in the object store and
    max_restarts > 0. If the arguments in the object store go out of scope or are lost, the
    actor restart will fail. See https://github.com/ray-project/ray/issues/53727 ...

Where it comes from: Ray Train 2.60's controller (the ``TrainController`` actor, a new
process for every ``trainer.fit()``, i.e. every stage) starts a ``PreemptionWatcher`` actor
for each worker group, with ``max_restarts=-1`` and the worker actors' handles as constructor
arguments. Ray's C++ core worker in the controller process checks, at actor creation, whether
an actor that may restart has arguments by reference or inlined references to non-detached
actors; worker handles are exactly that, so it logs the line at ERROR level, once per process,
to the controller's stderr. ``log_to_driver`` streams that stderr to the driver, which prints
it with the ``(TrainController pid=...)`` prefix. Nothing we pass causes it (the arguments are
Ray Train's own), and it is harmless: the risk it names is a failed restart of the watcher
once the workers behind its handles are gone, and Ray Train replaces the watcher with every
new worker group anyway. The only way to avoid it at the source would be
``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``, which would also switch off Ray Train's graceful
handling of drained (preempted) nodes, so we keep the watcher and filter the line instead.

:func:`hide_known_noise` wraps Ray's dispatcher of streamed worker output in this process
(the driver) and drops lines matching :data:`KNOWN_NOISE` only, before Ray's log
deduplication and printing. The line still lands in the controller's log file
(``<session>/logs/worker-*.err``). The wrapper uses a private Ray hook
(``ray._private.ray_logging.global_worker_stdstream_dispatcher``); if a Ray version lacks it,
nothing is filtered and one INFO line says what the Ray line means instead.
"""

from __future__ import annotations

import logging
import re
import threading

log = logging.getLogger(__name__)

KNOWN_NOISE: dict[str, re.Pattern] = {
    # ray-project/ray#53727, logged by Ray Train's PreemptionWatcher creation (see above).
    "PreemptionWatcher constructor arguments": re.compile(
        r"^(?:\[[^\]]*\] )?core_worker\.cc:\d+: Actor (?:\S+ )?with class name: "
        r"'PreemptionWatcher' and ID: '[0-9a-f]+' has constructor arguments in the object "
        r"store and max_restarts > 0\. If the arguments in the object store go out of scope "
        r"or are lost, the actor restart will fail\. See "
        r"https://github\.com/ray-project/ray/issues/53727 for more details\.\s*$"),
}

EXPLANATION = (
    "Ray may print 'core_worker.cc ... PreemptionWatcher ... has constructor arguments in "
    "the object store' once per stage: a known, harmless Ray Train message "
    "(ray-project/ray#53727), not a failure.")

_MARK = "_fadrm_known_noise_filter"
_lock = threading.Lock()
_explained = False


def is_known_noise(line: str) -> bool:
    return any(p.search(line) for p in KNOWN_NOISE.values())


def filter_batch(data: dict) -> dict | None:
    """``data`` (one batch of streamed worker output) without known noise lines; ``None``
    when nothing is left to print. A batch without noise is returned as is."""
    lines = data.get("lines") or []
    kept = [line for line in lines if not is_known_noise(line)]
    if len(kept) == len(lines):
        return data
    if not kept:
        return None
    return {**data, "lines": kept}


def _explain_once() -> None:
    global _explained
    if not _explained:
        _explained = True
        log.info(EXPLANATION)


def hide_known_noise() -> bool:
    """Filter known noise from the worker output Ray streams to this driver. Idempotent; call
    it before or after ``ray.init`` (the dispatcher exists from import on). Returns whether
    the filter is active."""
    with _lock:
        try:
            from ray._private import ray_logging

            dispatcher = ray_logging.global_worker_stdstream_dispatcher
            emit = dispatcher.emit
        except (ImportError, AttributeError):
            _explain_once()
            return False
        if getattr(emit, _MARK, False):
            return True

        def filtered_emit(data):
            batch = filter_batch(data)
            if batch is not None:
                emit(batch)

        setattr(filtered_emit, _MARK, True)
        filtered_emit.__wrapped__ = emit
        dispatcher.emit = filtered_emit
        return True
