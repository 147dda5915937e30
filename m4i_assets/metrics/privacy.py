"""Empirical privacy: a lower bound on a model's epsilon from what an attack achieves (README, Rules of evidence).

An (epsilon, delta)-DP training algorithm bounds every membership test's error rates (Kairouz et al. 2015;
Jagielski et al., NeurIPS 2020; Nasr et al., S&P 2021): for any threshold, with FPR and FNR = 1 - TPR,

    FPR + e^eps * FNR >= 1 - delta   and   FNR + e^eps * FPR >= 1 - delta,

so an attack that reaches (FPR, FNR) proves eps >= max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)).
Measured rates are estimates: the bound uses Clopper-Pearson upper limits of both error rates, which makes it
a lower bound with the stated confidence. Choosing the threshold on the same records that measure it would
bias the bound upward (a max over thresholds of noisy estimates), so the threshold is chosen on a seeded,
stratified half of the records and the bound is measured on the other half.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval for k successes in n trials (Clopper and Pearson 1934)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def epsilon_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """The epsilon that error rates (FPR, FNR) of one membership test prove for (epsilon, delta)-DP (0 if none)."""
    bounds = [0.0]
    for a, b in ((fpr, fnr), (fnr, fpr)):
        numerator = 1 - delta - a
        if numerator > 0:
            bounds.append(math.inf if b <= 0 else math.log(numerator / b))
    return max(bounds)


@dataclass(frozen=True)
class EmpiricalEpsilon:
    """An empirical epsilon lower bound and the test that gives it: the attack and threshold (chosen on the
    selection half), the measured TPR and FPR on the measurement half with their Clopper-Pearson intervals, and
    the half's size."""

    epsilon_lb: float
    attack: str | None
    delta: float
    confidence: float
    threshold: float
    tpr: float
    tpr_ci_low: float
    tpr_ci_high: float
    fpr: float
    fpr_ci_low: float
    fpr_ci_high: float
    n_members: int
    n_nonmembers: int

    def as_row(self) -> dict:
        return asdict(self)


def stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean masks splitting members and non-members each in half at random (seeded)."""
    rng = np.random.default_rng(seed)
    select = np.zeros(len(labels), dtype=bool)
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        select[idx[: len(idx) // 2]] = True
    return select, ~select


def _rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    predicted = scores >= threshold
    return (int((predicted & labels).sum()), int(labels.sum()), int((predicted & ~labels).sum()), int((~labels).sum()))


def _best_threshold(labels: np.ndarray, scores: np.ndarray, delta: float) -> tuple[float, float]:
    """(epsilon from point estimates, threshold) of the threshold test that proves the most."""
    best, threshold = -1.0, float(np.max(scores))
    for t in np.unique(scores):
        tp, n_pos, fp, n_neg = _rates_at(labels, scores, t)
        eps = epsilon_from_rates(fp / n_neg, 1 - tp / n_pos, delta)
        if eps > best and math.isfinite(eps):
            best, threshold = eps, float(t)
    return best, threshold


def empirical_epsilon(
    labels: np.ndarray,
    scores: np.ndarray | dict[str, np.ndarray],
    delta: float,
    confidence: float = 0.95,
    seed: int = 0,
) -> EmpiricalEpsilon:
    """Lower bound on epsilon from membership scores (higher = member), per Jagielski et al. 2020 / Nasr et al. 2021.

    `scores` is one attack's array or a dict of several attacks' arrays over the same records. The attack and
    its threshold maximise the bound on a seeded stratified half (point estimates); on the other half the
    bound is computed from the Clopper-Pearson upper limits of FPR and FNR, each at (1 + confidence) / 2 so
    that both hold together with probability `confidence`. Needs at least two members and two non-members."""
    labels = np.asarray(labels, dtype=bool)
    by_attack = {k: np.asarray(v, dtype=float) for k, v in scores.items()} if isinstance(scores, dict) else {
        None: np.asarray(scores, dtype=float)}  # fmt: skip
    if not by_attack:
        raise ValueError("need at least one attack's scores")
    for values in by_attack.values():
        if labels.shape != values.shape or labels.ndim != 1:
            raise ValueError(f"labels and scores must be 1-d of one length, got {labels.shape} and {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("scores contain NaN or infinity")
    if labels.sum() < 2 or (~labels).sum() < 2:
        raise ValueError(f"need at least two members and two non-members, got {labels.sum()} and {(~labels).sum()}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    select, measure = stratified_halves(labels, seed)
    picks = {a: _best_threshold(labels[select], v[select], delta) for a, v in by_attack.items()}
    attack = max(picks, key=lambda a: picks[a][0])
    threshold = picks[attack][1]
    tp, n_pos, fp, n_neg = _rates_at(labels[measure], by_attack[attack][measure], threshold)
    # Each limit one-sided at (1 + confidence) / 2 (a union bound over the two), i.e. the two-sided interval at:
    level = 1 - 2 * (1 - (1 + confidence) / 2)
    tpr_low, tpr_high = clopper_pearson(tp, n_pos, level)
    fpr_low, fpr_high = clopper_pearson(fp, n_neg, level)
    return EmpiricalEpsilon(
        epsilon_lb=epsilon_from_rates(fpr_high, 1 - tpr_low, delta),
        attack=attack,
        delta=delta,
        confidence=confidence,
        threshold=threshold,
        tpr=tp / n_pos,
        tpr_ci_low=tpr_low,
        tpr_ci_high=tpr_high,
        fpr=fp / n_neg,
        fpr_ci_low=fpr_low,
        fpr_ci_high=fpr_high,
        n_members=n_pos,
        n_nonmembers=n_neg,
    )
