"""Fault tolerance on a real multi-node Ray cluster (ray.cluster_utils.Cluster).

One worker group runs recover and then relabel. A worker node is removed while recover is
running, after at least one unit has been written. Both stages must finish, and their unit
outputs must be byte-identical to a fault-free in-process run: no unit missing, none
rewritten.
"""

import threading
from pathlib import Path

import pytest

from fadrm.config import load_config
from fadrm.executors import LocalExecutor
from fadrm.plan import RunPlan
from fadrm.progress import StageProgress
from fadrm.formats import shards
from tests.conftest import tiny_run_config


def _settings(root: Path, fmnist_root: Path, name: str) -> dict:
    cfg = tiny_run_config(root / name, fmnist_root, ipc=6,
                          relabel__epochs=60, relabel__epochs_per_shard=10)
    cfg["recover"]["stage_iterations"] = [40, 40, 40]
    cfg["execution"].update(min_workers=1, max_workers=2, max_failures=5)
    return cfg


def _run_local(plan: RunPlan, stages) -> None:
    exe = LocalExecutor("cpu")
    for stage in stages:
        exe.run_stage(stage, stage.pending(), StageProgress(stage.name, 1, enabled=False))


def _outputs(stage) -> dict[str, bytes]:
    return {Path(stage.unit_uri(u)).name: Path(stage.unit_uri(u)).read_bytes()
            for u in stage.units() if shards.is_complete(stage.unit_uri(u))}


class _Clock:
    """Records when the executor says each stage began and ended."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def begin(self, stage, pending):
        self.events.append(("begin", stage.name))
        return StageProgress(stage.name, len(pending), enabled=False)

    def end(self, stage):
        assert not stage.pending(), f"{stage.name} ended with units missing"
        self.events.append(("end", stage.name))


def _run_with_node_loss(cluster, executor, stages, queues) -> dict:
    """Run ``stages`` on one worker group; remove a worker node once a unit of the first
    is done."""
    import ray

    errors: list[BaseException] = []
    started = threading.Event()
    queues.clear()
    queues["event"] = started
    clock = _Clock()
    first = stages[0]

    def target():
        try:
            executor.run_stages([(s, s.pending()) for s in stages], clock)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=target)
    thread.start()
    assert started.wait(timeout=120), "the stage never created its unit queue"
    assert not errors, errors
    # The queues sit on the driver's node, so losing a worker node cannot lose them.
    driver_node = ray.get_runtime_context().get_node_id()
    assert ray.get(queues[first.name].node_id.remote(), timeout=60) == driver_node
    done_before = ray.get(queues[first.name].wait_done.remote(1), timeout=300)
    inodes = {u: Path(first.unit_uri(u)).stat().st_ino for u in done_before}
    victim = [n for n in cluster.worker_nodes][-1]
    cluster.remove_node(victim)
    thread.join(timeout=900)
    assert not thread.is_alive(), "stages did not finish after the node loss"
    if errors:
        raise errors[0]
    return {"done_before": done_before, "inodes": inodes, "events": clock.events}


@pytest.mark.slow
def test_node_loss_in_a_worker_group_running_recover_and_relabel(tmp_path, fmnist_root,
                                                                    worker_groups):
    import ray
    from ray.cluster_utils import Cluster

    from ray_jobs.executor import RayTrainExecutor

    ref = RunPlan(load_config(_settings(tmp_path, fmnist_root, "reference")))
    _run_local(ref, [*ref.squeeze.values(), ref.select, ref.recover, ref.relabel])

    plan = RunPlan(load_config(_settings(tmp_path, fmnist_root, "faulty")))
    _run_local(plan, [*plan.squeeze.values(), plan.select])  # cheap upstream, in-process

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        queues: dict = {}

        def on_queue(stage, queue):
            queues[stage.name] = queue
            queues["event"].set()

        executor = RayTrainExecutor(plan.cfg, on_queue=on_queue)
        # One worker group runs recover then relabel; a node is lost during recover, so
        # the restarted (smaller) group resumes recover and goes on to relabel.
        fault = _run_with_node_loss(cluster, executor, [plan.recover, plan.relabel], queues)
        assert len(worker_groups) == 1, worker_groups  # restarted inside Ray Train
        assert fault["events"] == [("begin", "recover"), ("end", "recover"),
                                   ("begin", "relabel"), ("end", "relabel")]
        assert len(fault["done_before"]) < len(plan.recover.units()), (
            "recover: every unit finished before the node was removed; "
            "the test did not exercise a fault")
        for stage, reference in ((plan.recover, ref.recover), (plan.relabel, ref.relabel)):
            total = len(stage.units())
            got, want = _outputs(stage), _outputs(reference)
            assert sorted(got) == sorted(want) and len(got) == total  # none missing
            for name in want:
                assert got[name] == want[name], f"{stage.name}: {name} differs from fault-free run"
        for unit, inode in fault["inodes"].items():  # finished units were never rewritten
            assert Path(plan.recover.unit_uri(unit)).stat().st_ino == inode, unit
    finally:
        ray.shutdown()
        cluster.shutdown()
