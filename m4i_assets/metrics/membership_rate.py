"""The estimated membership rate of an unlabelled audit: how many candidates score like members.

With candidates of unknown membership and known non-members from the same distribution, the share of
candidates scoring above the known non-members' (1 - alpha) quantile is, in expectation, alpha for
non-members and the attack's TPR at that FPR for members: share - alpha is a lower estimate of the
members' share among the candidates (exact when the attack separates them). Its 95% interval is the
Clopper-Pearson interval of the share, minus alpha. No AUC is computed: there are no labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from m4i_assets.metrics.privacy import clopper_pearson


@dataclass(frozen=True)
class MembershipRate:
    n_candidates: int
    n_known_nonmembers: int
    alpha: float
    threshold: float
    share_above: float
    estimated_rate: float
    ci_low: float
    ci_high: float

    def as_row(self) -> dict:
        return asdict(self)


def estimate_membership_rate(candidates: np.ndarray, known_nonmembers: np.ndarray, alpha: float) -> MembershipRate:
    """The share of `candidates` above the (1 - alpha) quantile of `known_nonmembers`' scores, minus alpha,
    with its Clopper-Pearson 95% interval (higher score = more likely member)."""
    candidates, known = np.asarray(candidates, dtype=float), np.asarray(known_nonmembers, dtype=float)
    if not len(candidates) or not len(known):
        raise ValueError(f"need candidates and known non-members, got {len(candidates)} and {len(known)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), not {alpha}")
    threshold = float(np.quantile(known, 1 - alpha, method="higher"))
    above = int((candidates > threshold).sum())
    low, high = clopper_pearson(above, len(candidates))
    share = above / len(candidates)
    return MembershipRate(
        len(candidates), len(known), alpha, threshold, share, share - alpha, low - alpha, high - alpha
    )
