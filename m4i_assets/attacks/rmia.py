"""RMIA, the relative membership inference attack (Zarifzadeh, Liu, Lee, Shokri, ICML 2024), offline.

Pr(x | theta) is the target's probability of record x; here the probability of its matched pair under the
pairing objective each model was trained with (`clip_loss`: exp of its log-likelihood, in (0, 1]; InfoNCE's
softmax probability for a CLIP, the geometric mean of the sigmoid pair-label probabilities for a SigLIP, each
model, target or reference, at its own logit scale and bias). The likelihood ratio of x is

    LR(x) = Pr(x | theta) / Pr(x),    Pr(x) = mean over reference models of Pr(x | theta_ref),

and x's score is the share of population records z (the known non-members) it dominates,
LR(x) / LR(z) > gamma (section 3, eq. 4; gamma = 1 by default). The reference models here are OUT for
every candidate (offline RMIA, section 3.2): Pr(x) from OUT models underestimates the IN/OUT average, which
the paper corrects linearly, Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2, with a = 0.3 its default
(a = 1 is the plain OUT average).
"""

from __future__ import annotations

import numpy as np

DEFAULT_A = 0.3


def offline_marginal(p_references: np.ndarray, a: float = DEFAULT_A) -> np.ndarray:
    """Pr(x) from OUT references (n, R): ((1 + a) mean_r p + (1 - a)) / 2 (Zarifzadeh et al., section 3.2)."""
    p_references = np.asarray(p_references, dtype=np.float64)
    if p_references.ndim != 2 or p_references.shape[1] < 1:
        raise ValueError(f"reference probabilities must be (n, R >= 1), got {p_references.shape}")
    if not 0 <= a <= 1:
        raise ValueError(f"RMIA's offline a must lie in [0, 1], got {a}")
    return ((1 + a) * p_references.mean(axis=1) + (1 - a)) / 2


def rmia_scores(
    p_target: np.ndarray,
    p_references: np.ndarray,
    p_target_population: np.ndarray,
    p_references_population: np.ndarray,
    a: float = DEFAULT_A,
    gamma: float = 1.0,
) -> np.ndarray:
    """Score of each record x: the share of population records z with LR(x) / LR(z) > gamma.

    p_target (n,), p_references (n, R): probabilities of the scored records under the target and the OUT
    references; the same for the population z, (m,) and (m, R)."""
    p_target, p_z = np.asarray(p_target, dtype=np.float64), np.asarray(p_target_population, dtype=np.float64)
    if len(p_target) != len(p_references) or len(p_z) != len(p_references_population) or len(p_z) == 0:
        raise ValueError("target and reference probabilities must have one row per record, and z must be non-empty")
    lr_x = p_target / offline_marginal(p_references, a)
    lr_z = np.sort(p_z / offline_marginal(p_references_population, a))
    # LR(x) / LR(z) > gamma  <=>  LR(z) < LR(x) / gamma: count sorted z below the bound
    return np.searchsorted(lr_z, lr_x / gamma, side="left") / len(lr_z)
