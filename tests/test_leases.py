"""Unit leases: two runs of one config on one output compute each unit once (issue 27 item 6)."""

import json
import logging
import socket
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest

from fadrm import leases, storage
from fadrm.config import load_config
from fadrm.executors import LocalExecutor
from fadrm.formats import shards
from fadrm.progress import StageProgress
from fadrm.stages import (EvaluateStage, RecoverStage, RelabelStage, SelectStage,
                          SqueezeStage)
from tests.conftest import tiny_run_config


def _foreign_lease(stage_dir, unit, generation=1, expires_in=600.0):
    """A lease file as another machine's run writes it."""
    uri = storage.join(str(stage_dir), f"{unit}.lease.{generation}")
    body = {"holder": "elsewhere:1:deadbeef", "claimed": time.time(),
            "expires": time.time() + expires_in}
    assert storage.create_exclusive(uri, json.dumps(body).encode())
    return uri


class _Cfg:
    class execution:
        train_workers = 1
        threads_per_worker = 1


class FakeStage:
    """Units that write a small artifact; counts computations; may block in a unit."""

    collective = False
    label = name = "fake"

    key = SimpleNamespace(key="fake")

    def __init__(self, directory, units=("a", "b", "c"), gate=None, cfg=None):
        self.dir, self._units, self.gate = str(directory), list(units), gate
        self.cfg = cfg or _Cfg()
        self.computed = Counter()
        self.started = threading.Event()  # a unit is being computed
        self.two = threading.Event()  # two computations have begun
        self.lock = threading.Lock()

    def __getstate__(self):  # to Ray workers: what a unit needs (they count by marker files)
        return {"dir": self.dir, "_units": self._units, "cfg": self.cfg, "gate": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.computed, self.lock = Counter(), threading.Lock()
        self.started, self.two = threading.Event(), threading.Event()

    def units(self):
        return self._units

    def unit_uri(self, unit):
        return storage.join(self.dir, f"{unit}.bin")

    def is_done(self, unit):
        return shards.is_complete(self.unit_uri(unit))

    def setup(self, ctx):
        return None

    def run_unit(self, state, unit, ctx):
        with self.lock:
            self.computed[unit] += 1
            if sum(self.computed.values()) >= 2:
                self.two.set()
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(60)
        storage.write_bytes_atomic(storage.join(self.dir, f"computed-{unit}-"
                                                 f"{storage.unique_suffix()}"), b"")
        shards.write_artifact(self.unit_uri(unit), unit.encode())


def _progress():
    return StageProgress("fake", 3, enabled=False)


def test_create_exclusive_has_one_winner(tmp_path):
    uri = str(tmp_path / "x.lease.1")
    start = threading.Barrier(8)
    wins = []

    def contend(i):
        start.wait()
        wins.append(storage.create_exclusive(uri, f"{i}".encode()))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert (tmp_path / "x.lease.1").read_bytes().decode().isdigit()
    assert [p.name for p in tmp_path.iterdir()] == ["x.lease.1"]  # no temporary left


def test_s3_create_exclusive_is_conditional(s3_endpoint):
    storage.configure()
    uri = f"s3://fadrm-test/leases-{storage.unique_suffix()}/u.lease.1"
    assert storage.create_exclusive(uri, b"first")
    assert not storage.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"


def test_claim_release_and_takeover(tmp_path):
    lease = leases.claim(str(tmp_path), "u", "me")
    assert lease is not None and lease.uri.endswith("u.lease.1")
    assert leases.claim(str(tmp_path), "u", "other") is None  # held, live
    lease.release()
    assert leases.lease_names(str(tmp_path), "u") == {}
    # Expired (its holder died elsewhere): the next generation takes it over.
    old = _foreign_lease(tmp_path, "u", expires_in=-1)
    taken = leases.claim(str(tmp_path), "u", "me")
    assert taken is not None and taken.uri.endswith("u.lease.2")
    taken.release()
    assert not storage.exists(old) and leases.lease_names(str(tmp_path), "u") == {}


def test_lease_of_a_dead_process_here_is_expired(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    body = {"holder": f"{socket.gethostname()}:{proc.stdout.strip()}:x",
            "expires": time.time() + 600}
    storage.create_exclusive(str(tmp_path / "u.lease.1"), json.dumps(body).encode())
    lease = leases.claim(str(tmp_path), "u", "me")
    assert lease is not None and lease.uri.endswith("u.lease.2")
    lease.release()


def test_lease_is_renewed_while_held(tmp_path):
    lease = leases.claim(str(tmp_path), "u", "me", ttl=0.3)
    first = json.loads(storage.read_bytes(lease.uri))["expires"]
    renewed = threading.Event()
    deadline = time.monotonic() + 30
    while not renewed.is_set() and time.monotonic() < deadline:
        # Poll the store (what another run sees): a later expiry than the claim's.
        if json.loads(storage.read_bytes(lease.uri))["expires"] > first:
            renewed.set()
        else:
            threading.Event().wait(0.05)
    lease.release()
    assert renewed.is_set()


def test_unit_leased_elsewhere_waits_then_is_taken_over(tmp_path, caplog):
    stage = FakeStage(tmp_path)
    held = _foreign_lease(tmp_path, "b")
    waiting = threading.Event()

    class Spy(logging.Handler):
        def emit(self, record):
            if "another run" in record.getMessage():
                waiting.set()

    spy = Spy()
    logging.getLogger("fadrm.executors").addHandler(spy)
    logging.getLogger("fadrm.executors").setLevel(logging.INFO)
    executor = LocalExecutor("cpu", poll_s=0.05)
    errors = []
    runner = threading.Thread(target=lambda: _run(executor, stage, errors))
    try:
        runner.start()
        assert waiting.wait(60)  # a and c done, b left to its holder
        assert stage.computed == Counter({"a": 1, "c": 1})
        storage.delete(held)  # its holder gave up without writing it
        runner.join(60)
    finally:
        executor.stop.set()
        logging.getLogger("fadrm.executors").removeHandler(spy)
    assert not runner.is_alive() and not errors
    assert stage.computed == Counter({"a": 1, "b": 1, "c": 1})
    assert all(stage.is_done(u) for u in stage.units())


def test_unit_finished_by_the_other_run_is_not_computed(tmp_path):
    stage = FakeStage(tmp_path)
    held = _foreign_lease(tmp_path, "b")
    executor = LocalExecutor("cpu", poll_s=0.05)
    done_elsewhere = threading.Thread(target=lambda: (
        stage.started.wait(60), shards.write_artifact(stage.unit_uri("b"), b"b"),
        storage.delete(held)))
    done_elsewhere.start()
    errors = []
    _run(executor, stage, errors)
    done_elsewhere.join(60)
    assert not errors and stage.computed == Counter({"a": 1, "c": 1})


def test_expired_lease_is_taken_over_by_a_run(tmp_path):
    stage = FakeStage(tmp_path)
    _foreign_lease(tmp_path, "b", expires_in=-5)
    errors = []
    _run(LocalExecutor("cpu", poll_s=0.05), stage, errors)
    assert not errors and stage.computed == Counter({"a": 1, "b": 1, "c": 1})
    assert not [p for p in tmp_path.iterdir() if ".lease." in p.name]


def test_two_executors_on_one_stage_compute_each_unit_once(tmp_path):
    gate = threading.Event()
    stage = FakeStage(tmp_path, units=[f"u{i}" for i in range(6)], gate=gate)
    first, second = LocalExecutor("cpu", poll_s=0.05), LocalExecutor("cpu", poll_s=0.05)
    errors = []
    a = threading.Thread(target=lambda: _run(first, stage, errors))
    b = threading.Thread(target=lambda: _run(second, stage, errors))
    a.start()
    assert stage.started.wait(60)  # the first run holds u0 and is inside it
    b.start()  # the second sees every unit pending, u0 among them (held by the first)
    assert stage.two.wait(60)  # the second run is computing a unit: not u0
    gate.set()
    a.join(60), b.join(60)
    assert not errors
    assert stage.computed == Counter({u: 1 for u in stage.units()})


def _run(executor, stage, errors):
    try:
        executor.run_stage(stage, stage.units(), _progress())
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


@pytest.mark.slow
def test_two_concurrent_runs_of_one_config_do_each_unit_once(tmp_path, fmnist_root,
                                                             monkeypatch):
    from fadrm.runner import run_pipeline

    computed = Counter()
    lock = threading.Lock()
    for cls in (SqueezeStage, SelectStage, RecoverStage, RelabelStage, EvaluateStage):
        def counted(self, state, unit, ctx, _orig=cls.run_unit):
            with lock:
                computed[(self.label, unit)] += 1
            return _orig(self, state, unit, ctx)
        monkeypatch.setattr(cls, "run_unit", counted)
    # Both runs have listed their pending units before either computes one.
    both_planned = threading.Barrier(2, timeout=300)
    real_run_stage = LocalExecutor.run_stage

    def run_stage(self, stage, pending, progress):
        if stage.name == "squeeze":
            both_planned.wait()
        return real_run_stage(self, stage, pending, progress)

    monkeypatch.setattr(LocalExecutor, "run_stage", run_stage)
    cfg = load_config(tiny_run_config(
        tmp_path, fmnist_root, ipc=1, squeeze={"epochs": 1, "batch_size": 64, "lr": 0.05},
        data__max_train_per_class=100, data__max_val=200,
        relabel={"epochs": 4, "batch_size": 10, "epochs_per_shard": 2}))
    results, errors = {}, []

    def one(name):
        try:
            results[name] = run_pipeline(cfg, LocalExecutor("cpu", poll_s=0.1),
                                         show_progress=False)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert computed and set(computed.values()) == {1}, computed
    labels = {label for label, _ in computed}
    assert labels == {"squeeze[0]", "select", "recover", "relabel", "evaluate"}
    first, second = results["first"], results["second"]
    for key in ("teacher_top1", "student_top1", "student_top1_best", "num_images"):
        assert first[key] == second[key], key
    assert not list(tmp_path.rglob("*.lease.*"))


@pytest.mark.slow
def test_ray_workers_leave_a_leased_unit_to_its_holder(tmp_path, fmnist_root):
    import ray

    from ray_jobs.executor import RayTrainExecutor

    cfg = load_config(tiny_run_config(tmp_path / "out", fmnist_root))
    stage = FakeStage(tmp_path / "stage", units=["a", "b", "c"], cfg=cfg)
    held = _foreign_lease(tmp_path / "stage", "b")
    errors = []

    def other_run_finishes_b():
        # The other run writes b once this one has done the rest (bounded look at storage).
        deadline = time.monotonic() + 300
        while not (stage.is_done("a") and stage.is_done("c")):
            if time.monotonic() > deadline:
                return
            threading.Event().wait(0.2)
        shards.write_artifact(stage.unit_uri("b"), b"b")
        storage.delete(held)

    other = threading.Thread(target=other_run_finishes_b)
    other.start()
    try:
        RayTrainExecutor(cfg).run_stage(stage, stage.units(),
                                        StageProgress("fake", 3, enabled=False))
    finally:
        ray.shutdown()
        other.join(300)
    assert not errors and all(stage.is_done(u) for u in stage.units())
    made = sorted(p.name.split("-")[1] for p in (tmp_path / "stage").glob("computed-*"))
    assert made == ["a", "c"]  # b was left to the run that held its lease
