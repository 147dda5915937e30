"""Honest evaluation of membership scores (Carlini et al., S&P 2022, "MIAs From First Principles").

Every attack outputs one real score per record, higher = more likely member; thresholds exist only
here. Reported: ROC AUC, balanced accuracy (best threshold, as in Carlini et al. table 1: an upper
bound, since the threshold is chosen on the evaluated scores), TPR at 1% and 0.1% FPR (the largest
TPR whose FPR is at most the bound), each with a seeded stratified bootstrap 95% CI, and a log-log
ROC plot.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


def roc_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1); ties move together."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.diff(s) != 0, True]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    n_pos, n_neg = y.sum(), (~y).sum()
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) identity; ties count one half."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    return float(tpr[fpr <= max_fpr].max())


def _balanced_accuracy(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(((tpr + 1 - fpr) / 2).max())


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    """Largest TPR over thresholds whose FPR is at most `max_fpr`."""
    return _tpr_at(*roc_curve_points(labels, scores), max_fpr)


def balanced_accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best balanced accuracy over thresholds: max (TPR + 1 - FPR) / 2."""
    return _balanced_accuracy(*roc_curve_points(labels, scores))


def _point_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    fpr, tpr = roc_curve_points(labels, scores)
    return {
        "auc": roc_auc(labels, scores),
        "balanced_accuracy": _balanced_accuracy(fpr, tpr),
        "tpr_at_1pct_fpr": _tpr_at(fpr, tpr, 0.01),
        "tpr_at_0_1pct_fpr": _tpr_at(fpr, tpr, 0.001),
    }


@dataclass(frozen=True)
class AttackEvaluation:
    n_members: int
    n_nonmembers: int
    point: dict[str, float]
    ci_low: dict[str, float]
    ci_high: dict[str, float]

    def as_row(self) -> dict[str, float | int]:
        row: dict[str, float | int] = {"n_members": self.n_members, "n_nonmembers": self.n_nonmembers}
        for name, value in self.point.items():
            row[name] = value
            row[f"{name}_ci_low"] = self.ci_low[name]
            row[f"{name}_ci_high"] = self.ci_high[name]
        return row


def row_problems(rows: list[dict]) -> list[str]:
    """What is wrong with a version's metric rows (none when sound): every metric and CI bound in [0, 1]
    with low <= high, and every attack judged on the same members and non-members. (A percentile bootstrap
    CI need not contain the point estimate, so that is not required.)"""
    problems = []
    for row in rows:
        for name in (k for k in row if f"{k}_ci_low" in row):
            low, point, high = row[f"{name}_ci_low"], row[name], row[f"{name}_ci_high"]
            if not (0 <= point <= 1 and 0 <= low <= high <= 1):
                problems.append(f"{row['attack']}: {name} {point} or its CI [{low}, {high}] outside [0, 1]")
    counts = {(r["n_members"], r["n_nonmembers"]) for r in rows}
    if len(counts) > 1:
        problems.append(f"attacks judged on different candidate sets (members, non-members): {sorted(counts)}")
    return problems


def evaluate_scores(
    labels: np.ndarray, scores: np.ndarray, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> AttackEvaluation:
    """Point metrics plus percentile bootstrap CIs, resampling members and non-members separately."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"need members and non-members, got {len(pos)} and {len(neg)}")
    point = _point_metrics(labels, scores)
    rng = np.random.default_rng(seed)
    boot_labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    samples = {k: np.empty(n_bootstrap) for k in point}
    for b in range(n_bootstrap):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        for k, v in _point_metrics(boot_labels, scores[idx]).items():
            samples[k][b] = v
    alpha = (1 - confidence) / 2
    return AttackEvaluation(
        n_members=len(pos),
        n_nonmembers=len(neg),
        point=point,
        ci_low={k: float(np.quantile(v, alpha)) for k, v in samples.items()},
        ci_high={k: float(np.quantile(v, 1 - alpha)) for k, v in samples.items()},
    )


def roc_plot_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> bytes:
    """Log-log ROC plot (one line per attack, label -> (labels, scores)) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    floor = 1e-4
    for name, (labels, scores) in curves.items():
        fpr, tpr = roc_curve_points(labels, scores)
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"{name} (AUC {roc_auc(labels, scores):.3f})")
    ax.plot([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05), xlabel="FPR", ylabel="TPR", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
