"""Fault tolerance on a real multi-node Ray cluster (ray.cluster_utils.Cluster).

A worker node is removed while recover (then relabel) is running, after at least one unit
has been written. The stage must finish, and its unit outputs must be byte-identical to a
fault-free in-process run: no unit missing, none rewritten.
"""

import threading
from pathlib import Path

import pytest

from fadrm import shards
from fadrm.config import load_config
from fadrm.pipeline import LocalExecutor, RunPlan, StageProgress
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


def _run_with_node_loss(cluster, executor, stage, queues) -> dict:
    """Run ``stage`` on the cluster; remove a worker node once one unit is done."""
    import ray

    errors: list[BaseException] = []
    started = threading.Event()
    queues.clear()
    queues["event"] = started

    def target():
        try:
            executor.run_stage(stage, stage.pending(), StageProgress(stage.name, 1, enabled=False))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=target)
    thread.start()
    assert started.wait(timeout=120), "the stage never created its unit queue"
    assert not errors, errors
    # The queue sits on the driver's node, so losing a worker node cannot lose it.
    driver_node = ray.get_runtime_context().get_node_id()
    assert ray.get(queues[stage.name].node_id.remote(), timeout=60) == driver_node
    done_before = ray.get(queues[stage.name].wait_done.remote(1), timeout=300)
    inodes = {u: Path(stage.unit_uri(u)).stat().st_ino for u in done_before}
    victim = [n for n in cluster.worker_nodes][-1]
    cluster.remove_node(victim)
    thread.join(timeout=900)
    assert not thread.is_alive(), "stage did not finish after the node loss"
    if errors:
        raise errors[0]
    return {"done_before": done_before, "inodes": inodes}


@pytest.mark.slow
def test_node_loss_during_recover_and_relabel(tmp_path, fmnist_root):
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
        for stage, reference in ((plan.recover, ref.recover), (plan.relabel, ref.relabel)):
            total = len(stage.units())
            fault = _run_with_node_loss(cluster, executor, stage, queues)
            assert len(fault["done_before"]) < total, (
                f"{stage.name}: every unit finished before the node was removed; "
                "the test did not exercise a fault")
            got, want = _outputs(stage), _outputs(reference)
            assert sorted(got) == sorted(want) and len(got) == total  # none missing
            for name in want:
                assert got[name] == want[name], f"{stage.name}: {name} differs from fault-free run"
            for unit, inode in fault["inodes"].items():  # finished units were never rewritten
                assert Path(stage.unit_uri(unit)).stat().st_ino == inode, unit
            cluster.add_node(num_cpus=1)  # replace the lost node for the next stage
    finally:
        ray.shutdown()
        cluster.shutdown()
