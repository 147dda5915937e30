"""Honest evaluation of membership scores (Carlini et al., S&P 2022, "MIAs From First Principles"; the
the README's rules of evidence).

Every attack outputs one real score per record, higher = more likely member; thresholds exist only
here. Reported per attack: ROC AUC, balanced accuracy (best threshold, as in Carlini et al. table 1: an
upper bound, since the threshold is chosen on the evaluated scores), TPR at 1% and 0.1% FPR (the largest
TPR whose FPR is at most the bound), each with a seeded stratified bootstrap 95% CI, and a log-log ROC plot.

- **Paired**: all attacks of a version score the same records, so one bootstrap resample (members and
  non-members resampled separately) applies to all of them (`evaluate_attacks`); the CI of each attack's
  *difference* from a baseline (CSA, the blind baseline) comes from the same resamples. CI overlap is not
  a test; the paired difference is.
- **Low FPR needs non-members**: TPR at x FPR from n non-members is reported only when n * x >= 10 (at
  least ten false positives can exist at the threshold); otherwise NULL with the reason
  (`low_fpr_reason`). The raw figure is kept as `*_raw` for the privacy-utility curves, labelled so.
- **A threshold fixed without the candidates** (`known_threshold`): the (1 - x) quantile of the attack's
  scores on the known non-members; TPR and the realised FPR on the candidates at it, with Clopper-Pearson
  intervals.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from scipy.stats import rankdata

from m4i_assets.metrics.privacy import clopper_pearson


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


FPR_BOUNDS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}
MIN_FALSE_POSITIVES = 10  # n_nonmembers * x must reach this for a TPR at x FPR to be reported
COMPARED = ("auc", *FPR_BOUNDS)  # the metrics attack_comparisons holds differences of


def low_fpr_reason(n_nonmembers: int, max_fpr: float) -> str | None:
    """Why a TPR at `max_fpr` from `n_nonmembers` is not reported (None when it is)."""
    if n_nonmembers * max_fpr + 1e-9 >= MIN_FALSE_POSITIVES:
        return None
    return (f"{n_nonmembers} non-members x {max_fpr:g} FPR = {n_nonmembers * max_fpr:g} false positives < "
            f"{MIN_FALSE_POSITIVES}: needs {int(np.ceil(MIN_FALSE_POSITIVES / max_fpr))} non-members")  # fmt: skip


def _point_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    fpr, tpr = roc_curve_points(labels, scores)
    return {
        "auc": roc_auc(labels, scores),
        "balanced_accuracy": _balanced_accuracy(fpr, tpr),
        **{name: _tpr_at(fpr, tpr, bound) for name, bound in FPR_BOUNDS.items()},
    }


def known_threshold(
    labels: np.ndarray, scores: np.ndarray, known_scores: np.ndarray | None, confidence: float = 0.95
) -> dict[str, float | str | None]:
    """For each FPR bound x: the threshold at the (1 - x) quantile of the known non-members' scores, and at
    it (score > threshold) the candidates' TPR and realised FPR with Clopper-Pearson CIs. Columns
    `known_threshold_<x>`, `known_threshold_tpr_<x>[_ci_low|_ci_high]`, `known_threshold_fpr_<x>[...]`;
    all NULL with `known_threshold_note` when the attack has no scores for the known non-members."""
    row: dict[str, float | str | None] = {}
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    for name, bound in FPR_BOUNDS.items():
        x = name.removeprefix("tpr_at_").removesuffix("_fpr")
        keys = [f"known_threshold_{x}"] + [f"known_threshold_{m}_{x}{s}" for m in ("tpr", "fpr")
                                            for s in ("", "_ci_low", "_ci_high")]  # fmt: skip
        if known_scores is None or len(known_scores) == 0:
            row.update(dict.fromkeys(keys))
            continue
        t = float(np.quantile(known_scores, 1 - bound))
        above = np.asarray(scores) > t
        tp, fp = int((above & labels).sum()), int((above & ~labels).sum())
        row[keys[0]] = t
        for metric, k, n in (("tpr", tp, n_pos), ("fpr", fp, n_neg)):
            low, high = clopper_pearson(k, n, confidence)
            row.update({f"known_threshold_{metric}_{x}": k / n, f"known_threshold_{metric}_{x}_ci_low": low,
                        f"known_threshold_{metric}_{x}_ci_high": high})  # fmt: skip
    n_known = 0 if known_scores is None else len(known_scores)
    row["known_threshold_note"] = (
        "this attack gives no score to the known non-members (it was fit on them, or the model was not queried on them)"
        if not n_known
        else f"threshold from {n_known} known non-members"
    )
    return row


@dataclass(frozen=True)
class AttackEvaluation:
    n_members: int
    n_nonmembers: int
    point: dict[str, float | None]
    ci_low: dict[str, float | None]
    ci_high: dict[str, float | None]
    notes: dict[str, str] = field(default_factory=dict)  # metric -> why it is NULL
    raw: dict[str, float] = field(default_factory=dict)  # TPRs below the false-positive floor, unreported

    def as_row(self) -> dict[str, float | int | str | None]:
        row: dict[str, float | int | str | None] = {"n_members": self.n_members, "n_nonmembers": self.n_nonmembers}
        for name, value in self.point.items():
            row[name] = value
            row[f"{name}_ci_low"] = self.ci_low[name]
            row[f"{name}_ci_high"] = self.ci_high[name]
        for name in FPR_BOUNDS:
            row[f"{name}_null_reason"] = self.notes.get(name)
            row[f"{name}_raw"] = self.raw.get(name)
        return row


def row_problems(rows: list[dict]) -> list[str]:
    """What is wrong with a version's metric rows (none when sound): every metric and CI bound in [0, 1]
    with low <= high (NULL metrics, with their reason, are fine), and every attack judged on the same
    members and non-members. (A percentile bootstrap CI need not contain the point estimate.)"""
    problems = []
    for row in rows:
        for name in (k for k in row if f"{k}_ci_low" in row):
            low, point, high = row[f"{name}_ci_low"], row[name], row[f"{name}_ci_high"]
            if point is None and low is None and high is None:
                continue
            if point is None or low is None or high is None or not (0 <= point <= 1 and 0 <= low <= high <= 1):
                problems.append(f"{row['attack']}: {name} {point} or its CI [{low}, {high}] outside [0, 1]")
    counts = {(r["n_members"], r["n_nonmembers"]) for r in rows}
    if len(counts) > 1:
        problems.append(f"attacks judged on different candidate sets (members, non-members): {sorted(counts)}")
    return problems


@dataclass(frozen=True)
class VersionEvaluation:
    """Every attack of one version from one set of paired resamples: per attack its `AttackEvaluation`,
    and `comparisons` rows (attack, baseline, metric, difference, ci_low, ci_high)."""

    attacks: dict[str, AttackEvaluation]
    comparisons: list[dict]
    samples: dict[str, dict[str, np.ndarray]] = field(repr=False, default_factory=dict)


def evaluate_attacks(
    labels: np.ndarray,
    scores: dict[str, np.ndarray],
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    baselines: tuple[str, ...] = (),
) -> VersionEvaluation:
    """Point metrics and percentile bootstrap CIs of every attack (scores of the same records, in the same
    order), resampling members and non-members separately, one resample for all attacks; and for each
    baseline present, the paired CI of every other attack's difference from it in AUC and in each
    reportable TPR at low FPR."""
    labels = np.asarray(labels, dtype=bool)
    scores = {a: np.asarray(s, dtype=float) for a, s in scores.items()}
    for attack, s in scores.items():
        if not np.isfinite(s).all():
            raise ValueError(f"{attack}: scores contain NaN or infinity")
        if s.shape != labels.shape:
            raise ValueError(f"{attack}: {s.shape[0]} scores for {labels.shape[0]} records")
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"need members and non-members, got {len(pos)} and {len(neg)}")
    rng = np.random.default_rng(seed)
    boot_labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    points = {a: _point_metrics(labels, s) for a, s in scores.items()}
    samples = {a: {k: np.empty(n_bootstrap) for k in points[a]} for a in scores}
    for b in range(n_bootstrap):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        for attack, s in scores.items():
            for k, v in _point_metrics(boot_labels, s[idx]).items():
                samples[attack][k][b] = v
    alpha = (1 - confidence) / 2
    notes = {name: r for name, bound in FPR_BOUNDS.items() if (r := low_fpr_reason(len(neg), bound))}
    attacks = {}
    for attack in scores:
        point = dict(points[attack])
        low = {k: float(np.quantile(v, alpha)) for k, v in samples[attack].items()}
        high = {k: float(np.quantile(v, 1 - alpha)) for k, v in samples[attack].items()}
        raw = {k: point[k] for k in FPR_BOUNDS}
        for k in notes:
            point[k] = low[k] = high[k] = None
        attacks[attack] = AttackEvaluation(len(pos), len(neg), point, low, high, dict(notes), raw)
    comparisons = []
    for base in (b for b in baselines if b in scores):
        for attack in (a for a in scores if a != base):
            for metric in (m for m in COMPARED if m not in notes):
                diff = samples[attack][metric] - samples[base][metric]
                comparisons.append({
                    "attack": attack, "baseline": base, "metric": metric,
                    "difference": points[attack][metric] - points[base][metric],
                    "ci_low": float(np.quantile(diff, alpha)), "ci_high": float(np.quantile(diff, 1 - alpha)),
                })  # fmt: skip
    return VersionEvaluation(attacks, comparisons, samples)


def evaluate_scores(
    labels: np.ndarray, scores: np.ndarray, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> AttackEvaluation:
    """One attack's point metrics plus percentile bootstrap CIs (see `evaluate_attacks`)."""
    return evaluate_attacks(labels, {"attack": scores}, n_bootstrap, confidence, seed).attacks["attack"]


def permutation_test(
    labels: np.ndarray, scores: np.ndarray, n_permutations: int = 1000, seed: int = 0
) -> dict[str, float]:
    """The AUC of `scores` against AUCs under seeded permutations of the labels: the one-sided p-value
    (1 + #{perm AUC >= observed}) / (1 + n), and the permutation AUCs' 2.5% and 97.5% quantiles."""
    labels = np.asarray(labels, dtype=bool)
    ranks = rankdata(scores)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    rng = np.random.default_rng(seed)

    def auc(lab: np.ndarray) -> float:
        return float((ranks[lab].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))

    observed = auc(labels)
    null = np.array([auc(rng.permutation(labels)) for _ in range(n_permutations)])
    return {"auc": observed, "p_value": float((1 + (null >= observed).sum()) / (1 + n_permutations)),
            "null_auc_q025": float(np.quantile(null, 0.025)), "null_auc_q975": float(np.quantile(null, 0.975)),
            "n_permutations": n_permutations}  # fmt: skip


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


def sklearn_disagreement(curves: dict[str, tuple[np.ndarray, np.ndarray]], rows: list[dict]) -> float:
    """Largest gap between our AUC / TPR@1%FPR (`rows`) and scikit-learn's on the same (labels, scores)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    gap = 0.0
    for row in rows:
        labels, scores = curves[row["attack"]]
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        gap = max(
            gap,
            abs(roc_auc_score(labels, scores) - row["auc"]),
            abs(tpr[fpr <= 0.01].max() - row["tpr_at_1pct_fpr_raw"]),
        )
    return float(gap)


def score_matrix(
    scored: pl.DataFrame, known: pl.DataFrame, version: str
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Ground truth and every attack's scores of a version's candidates aligned by record id, from its
    `membership_scores` rows with ground truth (attack, record_id, score, is_member); and each attack's scores of
    the known non-members (`known_nonmember_scores`: attack, score), where it has them."""
    if scored.is_empty():
        raise ValueError(f"no scored candidates with ground truth for {version}")
    wide = scored.pivot(on="attack", index=["record_id", "is_member"], values="score").sort("record_id")
    attacks = sorted(set(scored["attack"]))
    partial = [a for a in attacks if wide[a].null_count()]
    if partial:
        raise ValueError(f"{version}: attacks {partial} did not score every candidate the others scored")
    known_scores = {a: g["score"].to_numpy() for (a,), g in known.group_by(["attack"])}
    return wide["is_member"].to_numpy(), {a: wide[a].to_numpy() for a in attacks}, known_scores


def metric_rows(
    labels: np.ndarray,
    scores: dict[str, np.ndarray],
    known: dict[str, np.ndarray],
    n_bootstrap: int,
    seed: int,
    baselines: tuple[str, ...],
) -> tuple[list[dict], list[dict]]:
    """The `attack_metrics` rows of one version (`evaluate_attacks`' point metrics and paired bootstrap CIs, and
    the known non-members' thresholds, the rules of evidence) and its `attack_comparisons` rows."""
    ev = evaluate_attacks(labels, scores, n_bootstrap=n_bootstrap, seed=seed, baselines=baselines)
    rows = [{"attack": a, **e.as_row(), **known_threshold(labels, scores[a], known.get(a))}
            for a, e in ev.attacks.items()]  # fmt: skip
    return rows, ev.comparisons
