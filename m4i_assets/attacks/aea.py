"""AEA, the augmentation-enhanced attack (Ko et al., ICCV 2023, section 3.3).

delta_k = CS(x, t) - CS(T_k(x), t): a memorised pair loses more similarity under augmentation than an
unseen one. The released code has no AEA, so the aggregation is ours (Ko et al. 2023). Every
aggregation but the paper-shaped `mean` is fixed on the *known non-members* alone (never on the
candidates, so a score does not depend on which other candidates are scored or on their member share):

- `mean`: score = CS(x, t) + mean_k delta_k (the deltas' raw scale decides their weight);
- `known_zscore` (default): CS and every delta standardised by the known non-members' mean and std;
  score = z_CS + mean_k z_k (CS and the deltas' average weigh the same: the paper's CS + mean delta on a
  scale fixed without labels, chosen as the default for that reason, not by its AUC);
- `known_lr`: the log-likelihood ratio of a Gaussian non-member model N(mu, S) fitted on the
  known non-members' standardised features f = (z_CS, z_1..z_K) against the same Gaussian shifted by an
  equal amount along every feature (members have higher CS and larger drops); the ratio is monotone in
  1' S^-1 (f - mu), which weighs correlated transforms down instead of counting them K times.
  S is shrunk towards the identity (Ledoit-Wolf) because K + 1 features are estimated from few records.
"""

import numpy as np
import polars as pl

AGGREGATIONS = ("mean", "known_zscore", "known_lr")


def augmentation_deltas(cs_clean: np.ndarray, cs_augmented: np.ndarray) -> np.ndarray:
    """delta (n x K) from clean similarities (n,) and augmented similarities (n x K)."""
    return cs_clean[:, None] - cs_augmented


def _check(cs: np.ndarray, deltas: np.ndarray, what: str) -> None:
    if deltas.ndim != 2 or deltas.shape[0] != cs.shape[0]:
        raise ValueError(f"{what} deltas must be (n, K) with n = {cs.shape[0]}, got {deltas.shape}")


def aea_scores(
    cs_clean: np.ndarray,
    deltas: np.ndarray,
    aggregation: str = "known_zscore",
    cs_known: np.ndarray | None = None,
    deltas_known: np.ndarray | None = None,
) -> np.ndarray:
    """Membership score per record from its clean CS and its K per-transform deltas (n x K); the `known_*`
    aggregations need the known non-members' CS (m,) and deltas (m x K)."""
    _check(cs_clean, deltas, "candidate")
    if aggregation == "mean":
        return cs_clean + deltas.mean(axis=1)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown AEA aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    if cs_known is None or deltas_known is None or len(cs_known) < 2:
        raise ValueError(f"AEA aggregation {aggregation!r} needs the known non-members' CS and deltas")
    _check(cs_known, deltas_known, "known non-member")
    if deltas_known.shape[1] != deltas.shape[1]:
        raise ValueError(f"candidates have {deltas.shape[1]} transforms, known non-members {deltas_known.shape[1]}")
    known = np.c_[cs_known, deltas_known]
    mu, sd = known.mean(axis=0), known.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    z = (np.c_[cs_clean, deltas] - mu) / sd
    if aggregation == "known_zscore":
        return z[:, 0] + z[:, 1:].mean(axis=1)
    from sklearn.covariance import LedoitWolf

    cov = LedoitWolf().fit((known - mu) / sd).covariance_
    weights = np.linalg.solve(cov, np.ones(z.shape[1]))
    return z @ weights


def wide_deltas(deltas: pl.DataFrame, record_ids: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(clean CS (n,), per-transform deltas (n, K)) of these records, in their order, transforms sorted by name,
    from an `augmentation_deltas` signal (record_id, transform, cs_clean, delta); an error when it lacks some."""
    wide = deltas.pivot(on="transform", index=["record_id", "cs_clean"], values="delta")
    wide = pl.DataFrame({"record_id": record_ids}).join(wide, on="record_id", how="left")
    transforms = sorted(c for c in wide.columns if c not in ("record_id", "cs_clean"))
    if wide["cs_clean"].null_count():
        raise ValueError("augmentation_deltas lack some records: materialize it again")
    return wide["cs_clean"].to_numpy(), wide.select(transforms).to_numpy()
