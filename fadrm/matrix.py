"""The evaluation matrix in the report: each student model's top-1 over its seeds.

Papers evaluate a distilled set on several architectures and seeds (mean +- std); the
evaluate stage trains every (model, seed) as a unit of its own (``student.model`` as a list,
``student.seeds``), and this module turns their metrics into the report's ``students``
table and its picture, ``students.png``.
"""

from __future__ import annotations

import io
import statistics

__all__ = ["add_margins", "render_students", "summarise"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), rounded to 0.01 points."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return round(statistics.fmean(values), 2), round(std, 2)


def summarise(units: dict[str, dict]) -> dict[str, dict]:
    """Per model (in the matrix's order): its seeds, final and best top-1 per seed, and
    their mean and std."""
    students: dict[str, dict] = {}
    for m in units.values():
        row = students.setdefault(m["student_model"], {"seeds": [], "top1": [],
                                                       "top1_best": []})
        row["seeds"].append(m["student_seed"])
        row["top1"].append(m["student_top1"])
        row["top1_best"].append(m["student_top1_best"])
    for row in students.values():
        row["top1_mean"], row["top1_std"] = _mean_std(row["top1"])
        row["top1_best_mean"], row["top1_best_std"] = _mean_std(row["top1_best"])
    return students


def add_margins(students: dict[str, dict], random_real: dict[str, dict] | None) -> None:
    """Each model's mean top-1 minus the random-real run's mean for the same model and
    seeds (``margin_over_random_real``; None where there is no such run)."""
    for model, row in students.items():
        other = (random_real or {}).get(model)
        same = other is not None and other["seeds"] == row["seeds"]
        row["margin_over_random_real"] = (round(row["top1_mean"] - other["top1_mean"], 2)
                                          if same else None)


def render_students(students: dict[str, dict], title: str) -> bytes:
    """PNG: final top-1 per student model, mean with +- std error bars, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(students)
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2.0, 3.6))
    means = [students[n]["top1_mean"] for n in names]
    stds = [students[n]["top1_std"] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=6, color="#7aa6c2")
    for i, n in enumerate(names):
        ax.plot([i] * len(students[n]["top1"]), students[n]["top1"], "k.", ms=6)
        ax.annotate(f"{means[i]:.2f} ± {stds[i]:.2f}", (i, means[i]), ha="center",
                    va="bottom", xytext=(0, 8), textcoords="offset points", fontsize=8)
    low = min(min(students[n]["top1"]) for n in names)
    ax.set_ylim(max(0.0, low - 10.0), 100.0)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("student top-1 (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
