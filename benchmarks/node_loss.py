"""What a node loss costs: recover on a simulated 3-node Ray cluster, with and without one.

    python -m benchmarks.node_loss [--ipc 10] [--iterations 60]

Head (0 CPUs) + two 1-CPU worker nodes (ray.cluster_utils.Cluster). The recover stage runs
once fault-free and once with a worker node removed as soon as the first unit is finished.
Writes benchmarks/results/node_loss.json: wall seconds of both runs, the difference, and
whether the two runs' unit outputs are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from fadrm.config import load_config
from fadrm.executors import LocalExecutor
from fadrm.plan import RunPlan
from fadrm.progress import StageProgress
from fadrm.formats import shards

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results"
TIMEOUT: float | None = None


def settings(out: Path, ipc: int, iterations: int) -> dict:
    return {
        "name": "node-loss", "output": str(out), "seed": 0, "ipc": ipc,
        "data": {"kind": "idx", "root": str(FASHION_MNIST), "resolution": 28, "channels": 1,
                 "mean": [0.286], "std": [0.353], "max_train_per_class": 300, "max_val": 500},
        "teachers": [{"model": "convnet"}],
        "squeeze": {"epochs": 1, "batch_size": 64, "lr": 0.05},
        "select": {"num_candidates": 20, "num_crops": 2},
        "recover": {"method": "fadrm", "resolutions": [28] * 4,
                    "stage_iterations": [iterations] * 4, "lr": 0.05},
        "relabel": {"epochs": 2, "batch_size": 20, "epochs_per_shard": 1},
        "student": {"model": "convnet"},
        "execution": {"min_workers": 1, "max_workers": 2, "max_failures": 5,
                      "worker_start_timeout_s": TIMEOUT},
    }


def prepare(out: Path, ipc: int, iterations: int) -> RunPlan:
    plan = RunPlan(load_config(settings(out, ipc, iterations)))
    exe = LocalExecutor("cpu")
    for stage in [*plan.squeeze.values(), plan.select]:
        exe.run_stage(stage, stage.pending(), StageProgress(stage.name, 1, enabled=False))
    return plan


def timed_recover(plan: RunPlan, fault: bool) -> tuple[float, int]:
    import ray
    from ray.cluster_utils import Cluster

    from ray_jobs.executor import RayTrainExecutor

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        created = threading.Event()
        queues = {}

        def on_queue(stage, queue):
            queues["q"] = queue
            created.set()

        exe = RayTrainExecutor(plan.cfg, on_queue=on_queue)
        stage = plan.recover
        errors = []

        def target():
            try:
                exe.run_stage(stage, stage.pending(), StageProgress("recover", 1, enabled=False))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                created.set()

        start = time.perf_counter()
        thread = threading.Thread(target=target)
        thread.start()
        done_at_fault = 0
        if fault:
            created.wait(timeout=300)
            done_at_fault = len(ray.get(queues["q"].wait_done.remote(1), timeout=600))
            cluster.remove_node(cluster.worker_nodes and list(cluster.worker_nodes)[-1])
        thread.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - start, done_at_fault
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=60, help="per MRO stage (4 stages)")
    parser.add_argument("--worker-start-timeout", type=float, default=None,
                        help="execution.worker_start_timeout_s (default: Ray's 60 s)")
    args = parser.parse_args()
    global TIMEOUT
    TIMEOUT = args.worker_start_timeout
    with tempfile.TemporaryDirectory() as tmp:
        clean = prepare(Path(tmp) / "clean", args.ipc, args.iterations)
        faulty = prepare(Path(tmp) / "faulty", args.ipc, args.iterations)
        clean_s, _ = timed_recover(clean, fault=False)
        fault_s, done_at_fault = timed_recover(faulty, fault=True)
        a = {u: open(clean.recover.unit_uri(u), "rb").read() for u in clean.recover.units()}
        b = {u: open(faulty.recover.unit_uri(u), "rb").read() for u in faulty.recover.units()
             if shards.is_complete(faulty.recover.unit_uri(u))}
    result = {
        "units": len(a), "iterations_per_unit": 4 * args.iterations,
        "fault_free_seconds": round(clean_s, 1), "with_node_loss_seconds": round(fault_s, 1),
        "node_loss_cost_seconds": round(fault_s - clean_s, 1),
        "units_done_when_node_removed": done_at_fault,
        "outputs_identical": a == b,
        "worker_start_timeout_s": TIMEOUT,
        "machine": "2-core CPU, 3-node simulated cluster (head 0 CPU + 2 x 1-CPU workers)",
    }
    RESULTS.mkdir(exist_ok=True)
    name = "node_loss.json" if TIMEOUT is None else f"node_loss_timeout{TIMEOUT:g}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
