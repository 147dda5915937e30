"""Reference-calibrated attack: offline LiRA (Carlini et al., S&P 2022, section VI-C "offline").

Reference models are trained on data that excludes every candidate, so for each record they sample
the *OUT* distribution of its score. A record's target score is compared with that distribution:
score = (phi(s_target) - mean_r phi(s_ref_r)) / sigma, with phi the Fisher z-transform arctanh that
makes cosine similarities closer to Gaussian (LiRA's logit scaling plays this role for softmax
confidences) and sigma the global standard deviation of the OUT scores: the paper's fixed-variance
variant, recommended when there are few reference models (the default here is 4). Subtracting the
per-record OUT mean removes per-record difficulty (some pairs are easy to align for any model).
"""

import numpy as np

ATTACK_ID = "ref_calibrated"


def fisher_z(cs: np.ndarray) -> np.ndarray:
    return np.arctanh(np.clip(cs, -0.999999, 0.999999))


def lira_offline_scores(cs_target: np.ndarray, cs_references: np.ndarray) -> np.ndarray:
    """Offline LiRA with fixed variance. cs_target (n,), cs_references (n, R) from OUT models."""
    if cs_references.ndim != 2 or cs_references.shape[0] != cs_target.shape[0] or cs_references.shape[1] < 1:
        raise ValueError(f"reference scores must be (n, R>=1) with n = {cs_target.shape[0]}, got {cs_references.shape}")
    out = fisher_z(cs_references)
    mu = out.mean(axis=1)
    sigma = float((out - mu[:, None]).std()) if out.shape[1] > 1 else float(out.std())
    return (fisher_z(cs_target) - mu) / (sigma if sigma > 0 else 1.0)
