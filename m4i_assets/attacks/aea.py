"""AEA, the augmentation-enhanced attack (Ko et al., ICCV 2023, section 3.3).

delta_k = CS(x, t) - CS(T_k(x), t): a memorised pair loses more similarity under augmentation than an
unseen one. The released code has no AEA, so the aggregation is ours (ATTACKS.md section 1):
`mean` (default) is score = CS(x, t) + mean_k delta_k; `zscore` standardises each transform's deltas
over the scored records before averaging, so no single transform dominates by scale.
"""

import numpy as np

ATTACK_ID = "aea"
AGGREGATIONS = ("mean", "zscore")


def augmentation_deltas(cs_clean: np.ndarray, cs_augmented: np.ndarray) -> np.ndarray:
    """delta (n x K) from clean similarities (n,) and augmented similarities (n x K)."""
    return cs_clean[:, None] - cs_augmented


def aea_scores(cs_clean: np.ndarray, deltas: np.ndarray, aggregation: str = "mean") -> np.ndarray:
    """Membership score per record from its clean CS and its K per-transform deltas (n x K)."""
    if deltas.ndim != 2 or deltas.shape[0] != cs_clean.shape[0]:
        raise ValueError(f"deltas must be (n, K) with n = {cs_clean.shape[0]}, got {deltas.shape}")
    if aggregation == "mean":
        return cs_clean + deltas.mean(axis=1)
    if aggregation == "zscore":
        std = deltas.std(axis=0)
        z = (deltas - deltas.mean(axis=0)) / np.where(std > 0, std, 1.0)
        cs_std = cs_clean.std() or 1.0
        return (cs_clean - cs_clean.mean()) / cs_std + z.mean(axis=1)
    raise ValueError(f"unknown AEA aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
