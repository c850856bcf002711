"""Label-robust scores (DD-Ranking's HLR, IOR, LRS): the formula, the runs behind them, and
the report of a tiny run that asks for them."""

from __future__ import annotations

import json
import math

import pytest

from fadrm.config import config_from_dict
from fadrm.plan import config_fingerprint
from fadrm.runner import create_executor, print_summary, run_pipeline
from fadrm.scores import label_robust_score, score_configs
from tests.conftest import tiny_run_config


def _lrs(alpha: float) -> float:
    return 100 * (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))


def test_formula_on_known_inputs():
    s = label_robust_score(real_hard=90.0, syn_hard=70.0, syn=80.0, random_real=78.0)
    assert s["hlr"] == pytest.approx(20.0) and s["ior"] == pytest.approx(2.0)
    assert s["lrs"] == pytest.approx(_lrs(0.5 * 0.02 - 0.5 * 0.20), abs=1e-4)
    # The ends of the scale: a perfect IOR with w = 1 is 100 %, the worst is 0 %.
    assert label_robust_score(50, 50, 100, 0, weight=1.0)["lrs"] == pytest.approx(100.0)
    assert label_robust_score(50, 50, 0, 100, weight=1.0)["lrs"] == pytest.approx(0.0)
    # w = 0 is HLR alone: a set as good as the real data under hard labels scores 1/(e+1)...
    assert label_robust_score(80, 80, 10, 90, weight=0.0)["lrs"] == pytest.approx(_lrs(0.0), abs=1e-4)
    # ...and a worse set under hard labels scores lower, whatever its IOR.
    assert label_robust_score(80, 60, 90, 10, weight=0.0)["lrs"] < _lrs(0.0)


def test_the_runs_behind_the_scores(tmp_path, fmnist_root):
    cfg = config_from_dict(tiny_run_config(tmp_path, fmnist_root,
                                           evaluate={"scores": True}))
    runs = score_configs(cfg)
    rr, hard, full = runs["random_real"], runs["syn_hard"], runs["real_hard"]
    assert (rr.name, rr.recover.method, rr.relabel) == ("tiny-random-real", "random-real",
                                                        cfg.relabel)
    assert (hard.name, hard.relabel.label_mode) == ("tiny-hard-labels", "hard")
    assert hard.recover == cfg.recover and hard.student == cfg.student
    assert [t.model for t in full.teachers] == [cfg.student.model]
    assert not any(r.evaluate.scores for r in runs.values())  # no scores of scores
    # The baseline plays its own random-real role.
    base = config_from_dict(tiny_run_config(tmp_path, fmnist_root, evaluate={"scores": True},
                                            recover={"method": "random-real"}))
    assert score_configs(base)["random_real"] is None


def test_scores_count_in_the_fingerprint_only_when_on(tmp_path, fmnist_root):
    def fp(**evaluate):
        return config_fingerprint(config_from_dict(
            tiny_run_config(tmp_path, fmnist_root, evaluate=evaluate)))

    assert fp() == fp(score_weight=0.3)  # off: the section changes nothing
    assert fp(scores=True) != fp()
    assert fp(scores=True, score_weight=0.3) != fp(scores=True)


def test_a_run_with_scores_reports_them_from_cached_runs(tmp_path, fmnist_root, capsys):
    cfg = config_from_dict(tiny_run_config(tmp_path, fmnist_root, evaluate={"scores": True}))
    metrics = run_pipeline(cfg, create_executor(cfg, "local"), show_progress=False)
    s = metrics["scores"]
    runs = score_configs(cfg)

    def report(role):
        return json.loads((tmp_path / "runs" / runs[role].name / "latest" /
                           "metrics.json").read_text())

    # Each accuracy is the one its own run reported, and the formula joins them.
    assert s["syn_top1"] == metrics["student_top1"]
    assert s["random_real_top1"] == report("random_real")["student_top1"]
    assert s["syn_hard_top1"] == report("syn_hard")["student_top1"]
    # The student model is the squeezed teacher: full-data training is that teacher's.
    teacher_dirs = list((tmp_path / "squeeze").iterdir())
    assert len(teacher_dirs) == 1
    meta = json.loads((teacher_dirs[0] / "meta.json").read_text())
    assert s["real_hard_top1"] == meta["val_top1"]
    assert s == {**s, **label_robust_score(s["real_hard_top1"], s["syn_hard_top1"],
                                           s["syn_top1"], s["random_real_top1"])}
    on_disk = json.loads((tmp_path / "runs" / "tiny" / "latest" / "metrics.json").read_text())
    assert on_disk["scores"] == s
    print_summary(cfg, metrics)
    assert f"LRS {s['lrs']:.2f} %" in capsys.readouterr().out
    # A second run computes nothing and gives the same report.
    again = run_pipeline(cfg, create_executor(cfg, "local"), show_progress=False)
    assert again == metrics
