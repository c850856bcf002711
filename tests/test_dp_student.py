"""The data-parallel student (``student.batches_per_step`` > 1): what a step is, the lr rule
and warm-up, ranks taking different stored batches, keys, and the report naming it."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fadrm.config import RelabelConfig, StudentConfig, config_from_dict, load_config
from fadrm.errors import InputError
from fadrm.plan import RunPlan, config_fingerprint
from fadrm.relabel import relabel_epochs
from fadrm.student import cosine_lr, scaled_lr, step_groups, step_lr, train_student
from tests.conftest import tiny_run_config
from tests.test_student import (CPU, MEAN, STD, _ddp_worker, _train_recorded, intensity_data,
                                student_cfg, tiny_net)


def _table(images: torch.Tensor, batch_size: int, epochs: int = 2) -> pa.Table:
    return relabel_epochs([tiny_net(seed=1).eval()], images, MEAN, STD,
                          RelabelConfig(batch_size=batch_size, teacher_bn_mode="eval"),
                          range(epochs), seed=0, device=CPU, mixed_precision=False)


def _merge_pairs(table: pa.Table, batch_size: int) -> pa.Table:
    """The same rows as stored batches of twice the size: batches 2i and 2i + 1 become
    batch i (positions and CutMix partners of the second shifted by ``batch_size``)."""
    batch = table.column("batch").to_numpy()
    shift = (batch % 2) * batch_size
    partner = table.column("mix_partner").to_numpy()
    columns = {
        "batch": (batch // 2).astype(np.int32),
        "pos": (table.column("pos").to_numpy() + shift).astype(np.int32),
        "mix_partner": np.where(partner >= 0, partner + shift, partner).astype(np.int32),
    }
    for name, values in columns.items():
        i = table.column_names.index(name)
        table = table.set_column(i, pa.field(name, table.schema.field(name).type),
                                 pa.array(values, table.schema.field(name).type))
    return table


def _train(images, table, val, cfg, epochs=2):
    model = tiny_net(seed=5)
    result = train_student(model, images, lambda e: table, val, cfg, epochs, MEAN, STD, 4,
                           CPU, seed=0)
    return model, result


# --------------------------------------------------------------------------- the step


def test_a_step_of_two_stored_batches_is_one_stored_batch_of_both():
    """K = 2 stored batches of 4 (2 micro-batches each) train exactly as the paper's step on
    stored batches of 8 made of the same rows (4 micro-batches): same micro-batches, same
    BatchNorm batches, same gradient, same weights."""
    data = intensity_data(4, seed=0)  # 16 images: 4 stored batches of 4 per epoch
    table = _table(data.images, 4)
    dp_cfg = student_cfg(batches_per_step=2, lr=5e-3, lr_scaling="linear", warmup_epochs=0)
    dp, dp_result = _train(data.images, table, data, dp_cfg)
    paper, paper_result = _train(data.images, _merge_pairs(table, 4), data,
                                 student_cfg(accumulation_steps=4, lr=1e-2))
    assert dp_result["steps"] == paper_result["steps"] == 4  # 2 per epoch, not 4
    for name, value in paper.state_dict().items():
        torch.testing.assert_close(dp.state_dict()[name], value, atol=1e-6, rtol=1e-5)
    for a, b in zip(dp_result["history"], paper_result["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    assert dp_result["step"] == {"protocol": "data-parallel", "batches_per_step": 2,
                                 "ranks": 1, "lr_scaling": "linear", "peak_lr": 1e-2,
                                 "warmup_epochs": 0}
    assert paper_result["step"] == {"protocol": "paper", "batches_per_step": 1}


def test_step_groups_take_what_is_left_last():
    assert step_groups(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert step_groups(3, 1) == [range(0, 1), range(1, 2), range(2, 3)]


# --------------------------------------------------------------------------- lr rule


def test_lr_rules():
    assert scaled_lr(1e-3, 4, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 4, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 1, "sqrt") == 1e-3
    with pytest.raises(ValueError, match="cube"):
        scaled_lr(1e-3, 4, "cube")


def test_warm_up_ramps_step_by_step_then_follows_the_cosine():
    cfg = StudentConfig(lr=1e-3, batches_per_step=4, warmup_epochs=2, eta=2.0,
                        lr_scaling="sqrt")
    steps_per_epoch, epochs = 3, 10
    lrs = [step_lr(cfg, s // steps_per_epoch, epochs, s, steps_per_epoch) for s in range(9)]
    ramp = [1e-3 + 1e-3 * (s + 1) / 6 for s in range(6)]  # lr -> 2 lr (sqrt of 4) in 6 steps
    for s in range(6):
        assert lrs[s] == pytest.approx(cosine_lr(ramp[s], s // 3, epochs, 2.0), rel=1e-12)
    assert lrs[5] == pytest.approx(cosine_lr(2e-3, 1, epochs, 2.0))
    assert lrs[6] == pytest.approx(cosine_lr(2e-3, 2, epochs, 2.0))
    assert lrs[0] < lrs[1] < lrs[2]  # rising within the first epoch


def test_default_warm_up_is_a_twentieth_of_the_epochs_for_the_variant_only():
    assert StudentConfig(batches_per_step=2).warmup(60) == 3
    assert StudentConfig(batches_per_step=2).warmup(10) == 1
    assert StudentConfig().warmup(60) == 0
    assert StudentConfig(batches_per_step=2, warmup_epochs=0).warmup(60) == 0


def test_paper_step_keeps_the_per_epoch_cosine_exactly():
    cfg = StudentConfig(lr=3e-3, eta=2.0)
    for s in range(12):
        assert step_lr(cfg, s // 4, 3, s, 4) == cosine_lr(3e-3, s // 4, 3, 2.0)


def test_history_records_the_warmed_up_lr():
    data = intensity_data(4, seed=0)
    table = _table(data.images, 4, epochs=3)
    cfg = student_cfg(batches_per_step=2, lr=1e-2, warmup_epochs=1, eta=1.0,
                      lr_scaling="sqrt")
    _, result = _train(data.images, table, data, cfg, epochs=3)
    peak = 1e-2 * math.sqrt(2)
    # Epoch 0's last step ends the ramp at the peak; later epochs: the cosine of the peak.
    assert [h["lr"] for h in result["history"]] == pytest.approx(
        [cosine_lr(peak, e, 3, 1.0) for e in range(3)], rel=1e-12)


# --------------------------------------------------------------------------- ranks


def test_ranks_take_different_stored_batches(tmp_path):
    """W = 2 ranks with K = 2: each rank trains its own stored batch of a step, the step's
    gradient is that of both (equal to one rank accumulating them), steps halve."""
    data = intensity_data(4, seed=0)
    images = data.images[:13]  # stored batches (4, 4, 4, 1): steps {0, 1}, {2, 3}
    table = _table(images, 4)
    payload = {"images": images, "table": table, "val": data,
               "cfg": student_cfg(temperature=2.0, batches_per_step=2)}
    single, ref, ref_grads = _train_recorded(**payload)
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out), payload), nprocs=2)
    got = torch.load(out, weights_only=False)
    assert len(got["grads"]) == len(ref_grads) == 4  # 2 epochs x 2 steps (paper: 8)
    assert got["result"]["steps"] == ref["steps"] == 4
    assert got["result"]["step"]["ranks"] == 2
    for step_got, step_ref in zip(got["grads"], ref_grads, strict=True):
        for g, r in zip(step_got, step_ref, strict=True):
            torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-5)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(got["state"][name], value, atol=1e-5, rtol=1e-4)


def _bn_worker(rank: int, world: int, init_file: str, out_dir: str, payload: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model, _ = _train(**payload)
        torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_average_their_batchnorm_statistics(tmp_path):
    """Each rank's running statistics follow only its own stored batches; before the
    evaluation they are averaged over the ranks (DDP's default would keep rank 0's, which
    saw a quarter of the data at W = 4 and cost ~3 points on Fashion-MNIST)."""
    data = intensity_data(4, seed=0)
    table = _table(data.images, 4)
    payload = {"images": data.images, "table": table, "val": data,
               "cfg": student_cfg(batches_per_step=2)}
    mp.spawn(_bn_worker, args=(2, str(tmp_path / "init"), str(tmp_path), payload), nprocs=2)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ("1.running_mean", "1.running_var"):
        # Averaged: equal on every rank (with rank 0's broadcast at each forward, each rank
        # would end with its own last micro-batches folded in).
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=0)


def _hook_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fadrm.training import wrap_ddp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        out = {}
        for name in ("polled", "default"):
            torch.manual_seed(0)
            model = tiny_net()
            net = (wrap_ddp(model, CPU, world) if name == "polled"
                   else DistributedDataParallel(model))
            out[f"{name}_hook"] = net._get_ddp_logging_data().get("comm_hook")
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            x = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(rank))
            for _ in range(3):
                net(x).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            out[name] = model.state_dict()
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gloo_ranks_poll_for_the_gradient_average(tmp_path):
    """On gloo, wrap_ddp averages gradients with a hook that waits by polling (a sleeping
    rank's wake-up cost ~40 % of a small student's step); its weights are DDP's own, bit
    for bit."""
    mp.spawn(_hook_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["polled_hook"] == "polled_allreduce"
        assert got["default_hook"] != "polled_allreduce"
        for name, value in got["default"].items():
            assert torch.equal(got["polled"][name], value), name


def test_each_ranks_batchnorm_average_reaches_as_far_back_as_one_ranks():
    """Batch statistics that drift (the weights move): one rank folds in every update; W
    ranks each fold in every W-th. With the momentum made 1 - (1 - m) ** W their averaged
    running mean lags as one rank's does (W = 4 ranks with m unchanged lagged ~4x as far
    and lost ~1.2 points on Fashion-MNIST IPC50 against one rank at the same K)."""
    from fadrm.student import _rank_bn_momentum

    world, updates = 4, 400
    one = nn.BatchNorm1d(1)
    ranks = [nn.BatchNorm1d(1) for _ in range(world)]
    for rank in ranks:
        _rank_bn_momentum(rank, world)
        assert rank.momentum == pytest.approx(1 - 0.9 ** world)
    for t in range(updates):
        batch = torch.full((8, 1), float(t)) + torch.linspace(-1, 1, 8)[:, None]
        one(batch)
        ranks[t % world](batch)
    averaged = sum(float(r.running_mean) for r in ranks) / world
    lag_one = updates - 1 - float(one.running_mean)  # (1 - m) / m = 9 updates
    assert lag_one == pytest.approx(9.0, abs=0.01)
    assert abs(averaged - float(one.running_mean)) < 1.0  # unchanged m: ~28 updates more
    cumulative = nn.BatchNorm1d(1, momentum=None)
    _rank_bn_momentum(cumulative, world)
    assert cumulative.momentum is None


# --------------------------------------------------------------------------- config, keys


def test_batches_per_step_must_divide_among_the_ranks(tmp_path, fmnist_root):
    base = tiny_run_config(tmp_path, fmnist_root)
    with pytest.raises(InputError, match=r"student.batches_per_step: must be a multiple of "
                                         r"execution.train_workers \(2\)"):
        config_from_dict({**base, "student": {**base["student"], "batches_per_step": 3},
                          "execution": {**base["execution"], "train_workers": 2}})
    for key, value, message in (("lr_scaling", "cube", "student.lr_scaling"),
                                ("warmup_epochs", -1, "student.warmup_epochs"),
                                ("batches_per_step", 0, "student.batches_per_step")):
        with pytest.raises(InputError, match=message):
            config_from_dict({**base, "student": {**base["student"], key: value}})


def test_keys_change_only_for_the_variant(tmp_path, fmnist_root):
    base = tiny_run_config(tmp_path, fmnist_root)

    def variant(**student):
        return config_from_dict({**base, "student": {**base["student"], **student}})

    paper = variant()
    key = RunPlan(paper).evaluate.key.key
    # Unused by the paper's step: same evaluate key (same bytes).
    assert RunPlan(variant(lr_scaling="sqrt", warmup_epochs=3)).evaluate.key.key == key
    dp = variant(batches_per_step=2)
    assert RunPlan(dp).evaluate.key.key != key
    assert RunPlan(dp).relabel.key.key == RunPlan(paper).relabel.key.key
    assert RunPlan(variant(batches_per_step=2, lr_scaling="sqrt")).evaluate.key.key != \
        RunPlan(dp).evaluate.key.key
    assert config_fingerprint(dp) != config_fingerprint(paper)
    # The shipped configs keep their report folders (pinned in test_quiet_surprises).
    assert config_fingerprint(load_config("demo", ["output=/runs/demo"])) == "4bc71a8c3dc8"


def test_report_names_the_variant(tmp_path, fmnist_root, capsys):
    from fadrm.executors import LocalExecutor
    from fadrm.runner import print_summary, run_pipeline

    base = tiny_run_config(tmp_path, fmnist_root)
    cfg = config_from_dict({**base, "student": {**base["student"], "batches_per_step": 2,
                                                "warmup_epochs": 1}})
    metrics = run_pipeline(cfg, LocalExecutor("cpu"), show_progress=False)
    step = metrics["student_step"]
    assert step["protocol"] == "data-parallel" and step["batches_per_step"] == 2
    with open(RunPlan(cfg).evaluate.unit_uri("student")) as f:
        stored = json.load(f)
    assert stored["student_step"] == step
    print_summary(cfg, metrics)
    assert "data-parallel (not the paper's): 2 stored batches per step" in capsys.readouterr().out
    from fadrm.export import export_run

    export_run(cfg, str(tmp_path / "exported"))
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "the data-parallel variant: 2 stored batches per step" in card
