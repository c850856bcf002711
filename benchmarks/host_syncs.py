"""Host syncs and ATen ops per steady-state step of recover, relabel and the student.

    PYTHONPATH=. python -m benchmarks.host_syncs [--json PATH]

Counted on the CPU with a ``TorchDispatchMode`` (every ATen op the loops dispatch), on the
demo setting: the demo's ConvNet on 28 px, one channel, 10 classes, IPC 10, recover's class
block of 10 images, relabel batches of 20 labelled as 2 BN batches, the student at 2 x 10.
A *scalar sync* is an op whose result the host must read from the device
(``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``float(t)``; ``nonzero``,
``masked_select`` ...): on CUDA each one stalls the stream until the GPU catches up.

Per-iteration figures are differences between two runs of different length (setup and
teardown cancel): recover with 4 x 20 vs 4 x 40 iterations, relabel + student with 2 vs 4
epochs (per stored batch of 20). CPU seconds per recover iteration come from the same
difference of wall times (one thread).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make the host wait for the device's answer.
SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero",
    "aten.equal", "aten._unique2", "aten.unique_consecutive", "aten.unique_dim",
    "aten.repeat_interleave", "aten.nonzero_static",
})


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the block (by ``aten.name``)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[f"aten.{func._opname}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def syncs(self) -> int:
        return sum(n for name, n in self.ops.items() if name in SYNC_OPS)

    def sync_ops(self) -> dict[str, int]:
        return {name: n for name, n in self.ops.items() if name in SYNC_OPS}


# --------------------------------------------------------------------------- settings


def _teacher(seed: int = 0) -> torch.nn.Module:
    from fadrm.models import create_model

    torch.manual_seed(seed)
    net = create_model("convnet", 10, in_chans=1, image_size=28)
    # Non-trivial running statistics, as a trained teacher has.
    gen = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net


MEAN, STD = [0.2860], [0.3530]


def _recover_run(iterations: int, precision: str = "bf16", groups: int = 1):
    from fadrm.config import RecoverConfig
    from fadrm.synthesis import recover

    cfg = RecoverConfig(method="fadrm", resolutions=[28] * 4, stage_iterations=[iterations] * 4,
                        lr=0.05, jitter=4, crop_scale=[0.5, 1.0])
    init = torch.rand(10 * groups, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    init = (init - MEAN[0]) / STD[0]
    labels = torch.arange(10).repeat(groups)
    seed = 3 if groups == 1 else list(range(3, 3 + groups))
    teacher = _teacher()
    cpu = torch.device("cpu")

    def go():
        return recover(init, labels, [teacher], cfg, MEAN, STD, 28, seed=seed, device=cpu,
                       precision=precision)
    return go


def _student_runs(epochs: int):
    from fadrm.config import RelabelConfig, StudentConfig
    from fadrm.data import ImageSet
    from fadrm.models import create_model
    from fadrm.relabel import relabel_epochs
    from fadrm.student import train_student

    images = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    rcfg = RelabelConfig(epochs=epochs, batch_size=20, crop_scale=[0.5, 1.0])
    scfg = StudentConfig(model="convnet", accumulation_steps=2, eval_every=0)
    val = ImageSet(images[:20], torch.arange(20) % 10, [str(i) for i in range(10)])
    cpu = torch.device("cpu")
    teacher = _teacher()

    def relabel():
        return relabel_epochs([teacher], images, MEAN, STD, rcfg, range(epochs), seed=5,
                              device=cpu)

    def student(table):
        torch.manual_seed(0)
        model = create_model("convnet", 10, in_chans=1, image_size=28)
        return train_student(model, images, lambda e: table, val, scfg, epochs, MEAN, STD, 10,
                             cpu, seed=0)
    return relabel, student


def _counted(fn, *args):
    counter = OpCounter()
    with counter:
        out = fn(*args)
    return counter, out


def recover_figures(short: int = 20, long: int = 40, repeats: int = 3) -> dict:
    """Scalar syncs, ATen ops and CPU seconds per steady-state recover iteration."""
    a, _ = _counted(_recover_run(short))
    b, _ = _counted(_recover_run(long))
    n = 4 * (long - short)
    # Timing without the dispatch mode (it costs more than the ops on a CPU); process CPU
    # time, median of repeats, so other processes on a shared machine count less.
    times = {}
    for iters in (short, long):
        go = _recover_run(iters)
        go()  # warm-up (first-call allocations, oneDNN primitive caches)
        runs = []
        for _ in range(repeats):
            start = time.process_time()
            go()
            runs.append(time.process_time() - start)
        times[iters] = sorted(runs)[len(runs) // 2]
    times = [times[short], times[long]]
    return {
        "scalar_syncs_per_iteration": (b.syncs - a.syncs) / n,
        "sync_ops": {k: (b.ops[k] - a.ops[k]) / n for k in set(b.sync_ops()) | set(a.sync_ops())},
        "aten_ops_per_iteration": (b.total - a.total) / n,
        "cpu_seconds_per_iteration": (times[1] - times[0]) / n,
    }


def grouped_recover_figures(groups: int = 4, short: int = 5, long: int = 10) -> dict:
    """ATen ops and scalar syncs per problem-iteration when ``groups`` problems (IPC
    indices of a class block) share one forward (``recover(seed=[...])``)."""
    a, _ = _counted(_recover_run(short, groups=groups))
    b, _ = _counted(_recover_run(long, groups=groups))
    n = 4 * (long - short)
    return {"groups": groups,
            "aten_ops_per_problem_iteration": (b.total - a.total) / n / groups,
            "scalar_syncs_per_iteration": (b.syncs - a.syncs) / n}


def student_figures(short: int = 2, long: int = 4) -> dict:
    """Scalar syncs per stored relabel + student batch (relabel and student each)."""
    out = {}
    batches = 100 // 20
    for name in ("relabel", "student"):
        counts = []
        for epochs in (short, long):
            relabel, student = _student_runs(epochs)
            table = relabel()
            fn, args = (relabel, ()) if name == "relabel" else (student, (table,))
            counts.append(_counted(fn, *args)[0])
        n = batches * (long - short)
        out[f"{name}_scalar_syncs_per_batch"] = (counts[1].syncs - counts[0].syncs) / n
        out[f"{name}_sync_ops"] = {
            k: (counts[1].ops[k] - counts[0].ops[k]) / n
            for k in set(counts[1].sync_ops()) | set(counts[0].sync_ops())}
    out["scalar_syncs_per_stored_batch"] = (out["relabel_scalar_syncs_per_batch"]
                                            + out["student_scalar_syncs_per_batch"])
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    figures = {"recover": recover_figures(), "recover_grouped": grouped_recover_figures(),
               "relabel_student": student_figures(),
               "setting": "demo: convnet 28 px, 1 channel, 10 classes, IPC 10, CPU, 1 thread"}
    text = json.dumps(figures, indent=2, sort_keys=True)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return figures


if __name__ == "__main__":
    main()
