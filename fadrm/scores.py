"""Label-robust scores: how much of a distilled set's accuracy is the data's own.

Soft labels carry much of a distilled set's accuracy: random real images trained with the
same soft labels often come close. DD-Ranking (Li et al., "DD-Ranking: Rethinking the
Evaluation of Dataset Distillation", arXiv 2505.13300) therefore reports, beside top-1:

- HLR, hard-label recovery = acc(full real data, hard labels) - acc(distilled set, hard
  labels): how far the images alone fall short of the real data (lower is better);
- IOR, improvement over random = acc(distilled set, its protocol) - acc(random real subset
  of the same size, the same protocol): what the images add (higher is better);
- LRS, label-robust score = 100 % x (e^a - e^-1) / (e - e^-1) with a = w IOR - (1 - w) HLR,
  the accuracies as fractions and w = 0.5 on its leaderboard.

Where ours differs from DD-Ranking's: every student here trains with this config's evaluate
protocol (the stored views, AdamW at the configured lr with the cosine schedule), not
DD-Ranking's grid of learning rates; the full-data hard-label accuracy is the student model
trained by this config's squeeze protocol (the teacher's recipe), and the hard-label run of
the distilled set trains on relabel's stored views with the class label in place of the
teacher's logits (CutMix mixes the two labels by area).

This module builds the configs of the runs the scores need and computes the formula;
:func:`fadrm.runner.run_pipeline` runs them (each content-keyed and cached like any run).
"""

from __future__ import annotations

import math

from fadrm.config import RunConfig, config_from_dict, config_to_dict

__all__ = ["BASELINE", "label_robust_score", "score_configs"]

BASELINE = "random-real"


def label_robust_score(real_hard: float, syn_hard: float, syn: float, random_real: float,
                       weight: float = 0.5) -> dict:
    """HLR, IOR (points) and LRS (%) from four top-1 accuracies in percent."""
    hlr = real_hard - syn_hard
    ior = syn - random_real
    alpha = (weight * ior - (1.0 - weight) * hlr) / 100.0
    lrs = 100.0 * (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0))
    return {"hlr": round(hlr, 4), "ior": round(ior, 4), "lrs": round(lrs, 4)}


def _variant(cfg: RunConfig, suffix: str, changes: dict) -> RunConfig:
    """``cfg`` under the name ``<name>-<suffix>`` with ``changes`` (section -> fields) applied
    and no scores of its own."""
    data = config_to_dict(cfg)
    data["name"] = f"{cfg.name}-{suffix}"
    data["evaluate"]["scores"] = False
    for section, fields in changes.items():
        if isinstance(fields, dict):
            data[section].update(fields)
        else:
            data[section] = fields
    return config_from_dict(data)


def score_configs(cfg: RunConfig) -> dict[str, RunConfig | None]:
    """The runs behind ``cfg``'s scores, by role (None: ``cfg`` itself plays it).

    - ``random_real``: the same data, IPC, teachers, relabel and student, random real images;
    - ``syn_hard``: the same distilled images with hard labels (relabel.label_mode hard);
    - ``real_hard``: only its squeeze stage is run: the student model trained on the full
      training set with hard labels. Its key is a squeezed teacher's when that teacher is
      the student model (index 0), so the demo gets it for free.
    """
    student = cfg.student
    teacher = {"model": student.model, "small_stem": student.small_stem}
    return {
        "random_real": None if cfg.recover.method == BASELINE
        else _variant(cfg, BASELINE, {"recover": {"method": BASELINE}}),
        "syn_hard": None if cfg.relabel.label_mode == "hard"
        else _variant(cfg, "hard-labels", {"relabel": {"label_mode": "hard", "top_k": 0}}),
        # Only its squeeze runs; random-real keeps it valid for any method (FADRM+ wants
        # several teachers).
        "real_hard": _variant(cfg, "full-data", {"teachers": [teacher], "select": {"teacher": 0},
                                                 "recover": {"method": BASELINE}}),
    }
