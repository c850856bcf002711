"""The accuracy benchmark's bookkeeping: seeds aggregate into rows, targets are judged right.

The benchmarks themselves are scripts (minutes to an hour); what is tested here is the part
that turns their runs into the published figures, so a wrong mean, std or target verdict
cannot reach benchmarks/README.md unnoticed.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import accuracy


def _run(dataset, method, ipc, seed, top1, teacher=80.0):
    return {"dataset": dataset, "method": method, "ipc": ipc, "seed": seed, "top1": top1,
            "top1_best": top1 + 1, "teacher_top1": teacher, "seconds": 10.0}


def test_aggregate_mean_and_sample_std_over_seeds():
    runs = [_run("cifar10", "fadrm", 10, s, v) for s, v in [(2, 62.0), (0, 60.0), (1, 61.0)]]
    (row,) = accuracy.aggregate(runs)
    assert row["seeds"] == [0, 1, 2]
    assert row["top1_mean"] == pytest.approx(61.0)
    assert row["top1_std"] == pytest.approx(1.0)  # sample std (n - 1) of 60, 61, 62
    assert row["of_teacher"] == pytest.approx(61.0 / 80.0)
    assert row["top1_best_mean"] == pytest.approx(62.0)


def test_rows_are_ordered_by_dataset_ipc_then_method_order():
    runs = [_run("fmnist", "fadrm", 10, 0, 80.0), _run("cifar10", "fadrm+", 1, 0, 30.0),
            _run("cifar10", "random-real-hard", 1, 0, 20.0), _run("cifar10", "rded", 10, 0, 50)]
    keys = [(r["dataset"], r["ipc"], r["method"]) for r in accuracy.aggregate(runs)]
    assert keys == [("cifar10", 1, "random-real-hard"), ("cifar10", 1, "fadrm+"),
                    ("cifar10", 10, "rded"), ("fmnist", 10, "fadrm")]


def _checks(fadrm, rded, fadrm_plus, teacher=80.0):
    runs = []
    for method, values in [("fadrm", fadrm), ("rded", rded), ("fadrm+", fadrm_plus)]:
        runs += [_run("cifar10", method, 10, s, v, teacher) for s, v in enumerate(values)]
    return accuracy.checks(accuracy.aggregate(runs))


def test_checks_two_std_margin_and_teacher_ratio():
    # fadrm 70 +- 1, rded 66 +- 1: margin 4 > 2 std = 2 -> met; 70 / 80 = 0.875 >= 0.85.
    out = _checks([69, 70, 71], [65, 66, 67], [70, 71, 72])
    assert out["cifar10_ipc10_fadrm_above_rded_by_2std"]["met"] is True
    assert out["cifar10_ipc10_fadrm_above_rded_by_2std"]["margin"] == pytest.approx(4.0)
    assert out["cifar10_ipc10_of_teacher"] == {"value": pytest.approx(0.875), "met": True}
    assert out["cifar10_ipc10_fadrm+_above_fadrm"]["met"] is True
    assert out["cifar10_ipc50_of_teacher"] is None  # not measured: not judged


def test_checks_fail_when_margin_is_within_noise():
    # margin 1.5 < 2 * max std (2 * 1.5 = 3): not met, even though fadrm's mean is higher.
    out = _checks([68.5, 70, 71.5], [67, 68.5, 70], [66, 67, 68], teacher=90.0)
    assert out["cifar10_ipc10_fadrm_above_rded_by_2std"]["met"] is False
    assert out["cifar10_ipc10_of_teacher"]["met"] is False  # 70 / 90 < 0.85
    assert out["cifar10_ipc10_fadrm+_above_fadrm"]["met"] is False


def test_single_seed_rows_are_not_judged_by_std():
    out = _checks([70], [60], [71])
    assert "cifar10_ipc10_fadrm_above_rded_by_2std" not in out


def test_wide_table_has_one_cell_per_method_and_the_teacher():
    runs = [_run("fmnist", m, 10, s, 70.0 + s, teacher=90.0)
            for m in ("random-real", "fadrm") for s in (0, 1)]
    table = accuracy.wide_table(accuracy.aggregate(runs)).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert header == ["dataset", "IPC", *accuracy.METHODS, "teacher"]
    row = dict(zip(header, cells))
    assert row["fadrm"] == f"70.50 ± {math.sqrt(0.5):.2f} (2)"
    assert row["rded"] == ""
    assert row["teacher"] == "90.00"


def test_budget_signature_changes_with_the_budget():
    cpu = dict(accuracy.BUDGETS["cpu"])
    other = dict(cpu, epochs=cpu["epochs"] + 1)
    assert accuracy.budget_signature(cpu) == accuracy.budget_signature(dict(cpu))
    assert accuracy.budget_signature(cpu) != accuracy.budget_signature(other)


def test_paired_differences_are_reported_beside_the_two_std_criterion():
    out = _checks([61, 64, 67], [60, 62, 66], [70, 71, 72])
    check = out["cifar10_ipc10_fadrm_above_rded_by_2std"]
    assert check["met"] is False  # margin 4/3 < 2 * 3
    assert check["paired_diff_mean"] == pytest.approx(4 / 3)
    assert check["paired_diff_min"] == pytest.approx(1.0)


def test_methods_come_from_the_registry_in_the_published_order(tmp_path):
    from fadrm.config import load_config
    from fadrm.methods import create_method, list_methods

    # The order of accuracy.json's rows and of the published table's columns.
    assert accuracy.METHODS == list_methods(variants=True) == [
        "random-real-hard", "random-real", "rded", "sre2l", "fadrm", "fadrm+"]
    budget = accuracy.BUDGETS["quick"]
    for method in accuracy.METHODS:
        raw = accuracy.run_config("fmnist", method, 10, 0, budget, ["a.pt", "b.pt"], tmp_path,
                                  "cpu")
        spec = create_method(method)
        assert raw["recover"]["method"] == spec.recover_method, method
        assert raw["relabel"]["label_mode"] == ("hard" if method == "random-real-hard"
                                                else "soft"), method
        assert len(raw["teachers"]) == (2 if method == "fadrm+" else 1), method
        assert load_config(raw).recover.method == spec.recover_method
