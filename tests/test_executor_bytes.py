"""One content key, one set of bytes (issue 27 item 2): what a stage's bytes depend on is
in its key, whichever executor and however many workers run it."""

import hashlib
from pathlib import Path

import pytest

from fadrm.config import load_config
from fadrm.errors import InputError
from fadrm.executors import LocalExecutor
from fadrm.plan import RunPlan
from fadrm.runner import run_pipeline
from tests.conftest import tiny_run_config


def _small(out: Path, root: Path, **overrides):
    settings = dict(ipc=1, squeeze={"epochs": 1, "batch_size": 64, "lr": 0.05},
                    data__max_train_per_class=100, data__max_val=200,
                    relabel={"epochs": 4, "batch_size": 10, "epochs_per_shard": 2})
    settings.update(overrides)
    return load_config(tiny_run_config(out, root, **settings))


def _outputs(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(stage, key) -> {file: sha256} of every unit output (not sidecars, timings, leases).
    evaluate's metrics.json records times, so it is left out; its student.pt is not."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for path in out.glob("*/*/*"):
        stage, key, name = path.parts[-3:]
        if stage == "runs" or name.endswith(".json") or ".lease." in name:
            continue
        found.setdefault((stage, key), {})[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_train_workers_is_in_the_training_stages_keys_only_above_one(tmp_path, fmnist_root):
    one = RunPlan(_small(tmp_path, fmnist_root))
    same = RunPlan(_small(tmp_path, fmnist_root, execution={"train_workers": 1}))
    two = RunPlan(_small(tmp_path, fmnist_root,
                         execution={"train_workers": 2, "min_workers": 1, "max_workers": 2}))
    keys = lambda plan: {s.label: s.key.key for s in plan.stages}  # noqa: E731
    assert keys(one) == keys(same)
    # A teacher trained on 2 ranks is another teacher: every stage that uses it changes.
    assert all(keys(one)[k] != keys(two)[k] for k in keys(one))
    assert two.squeeze[0].key.components["train_workers"] == 2
    assert "train_workers" not in one.squeeze[0].key.components


def test_local_executor_refuses_several_training_ranks(tmp_path, fmnist_root):
    cfg = _small(tmp_path, fmnist_root, execution={"train_workers": 2, "max_workers": 2})
    with pytest.raises(InputError, match=r"execution\.train_workers"):
        run_pipeline(cfg, LocalExecutor("cpu"), show_progress=False)
    assert not list(tmp_path.glob("*/*/*.pt"))  # refused before any stage computed


def test_ray_group_size_follows_train_workers(tmp_path, fmnist_root):
    from types import SimpleNamespace

    from ray_jobs.executor import _group_size

    plan = RunPlan(_small(tmp_path, fmnist_root))
    exe = SimpleNamespace(min_workers=1, max_workers=4, train_workers=1)
    train = [(plan.squeeze[0], ["teacher"])]
    units = [(plan.recover, ["b000-i0000", "b000-i0001", "b000-i0002"])]
    assert _group_size(exe, train) == 1  # one rank trains: more workers would idle
    assert _group_size(exe, train + units) == (1, 3)  # elastic for the unit stages
    exe.train_workers = 3
    assert _group_size(exe, train + units) == 3  # fixed: the key says 3 ranks
    assert _group_size(exe, units) == (1, 3)


@pytest.mark.slow
def test_local_and_ray_give_one_key_one_set_of_bytes(tmp_path, fmnist_root):
    import ray

    from fadrm.runner import run_config

    local = _small(tmp_path / "local", fmnist_root)
    run_pipeline(local, LocalExecutor("cpu"), show_progress=False)
    on_ray = _small(tmp_path / "ray", fmnist_root,
                    execution={"min_workers": 2, "max_workers": 2, "device": "cpu"})
    try:
        run_config(on_ray, "ray", show_progress=False)
    finally:
        ray.shutdown()
    a, b = _outputs(tmp_path / "local"), _outputs(tmp_path / "ray")
    assert {s for s, _ in a} == {"squeeze", "select", "recover", "relabel", "evaluate"}
    assert set(a) == set(b)  # same config, default train_workers: the same keys...
    for where in a:
        assert a[where] == b[where], where  # ...so the same bytes, file by file
