"""Reference-calibrated attacks: a record's signal on the target compared with its signal on OUT models.

`ref_calibrated` (CLIP) is offline LiRA with one global variance (Carlini et al., S&P 2022, section VI-C
"offline"): reference CLIPs are trained without any candidate, so for each record they sample the *OUT*
distribution of its score, and

    score = (phi(s_target) - mean_r phi(s_ref_r)) / sigma,

with phi the Fisher z-transform arctanh of the cosine similarity (LiRA's logit scaling plays this role for
softmax confidences) and sigma the global standard deviation of the OUT scores. With one global variance
the test ranks exactly like phi(s) - mean phi(s_ref): this *is* difficulty calibration (Watson et al., ICLR
2022, "On the importance of difficulty calibration in membership inference attacks"), which the default of
few (4) references calls for; per-record variances need many references. The same calibration, on the
captioner's negative log-likelihood, is `m4i_loss_ref` (`attacks.caption_loss`).
"""

import numpy as np


def fisher_z(cs: np.ndarray) -> np.ndarray:
    return np.arctanh(np.clip(cs, -0.999999, 0.999999))


def difficulty_calibrated(signal_target: np.ndarray, signal_references: np.ndarray) -> np.ndarray:
    """(signal_target - mean_r signal_ref_r) / sigma, sigma the global spread of the OUT signals around
    their per-record means (higher signal = more likely member). signal_references is (n, R) from OUT models."""
    signal_target = np.asarray(signal_target, dtype=np.float64)
    out = np.asarray(signal_references, dtype=np.float64)
    if out.ndim != 2 or out.shape[0] != signal_target.shape[0] or out.shape[1] < 1:
        raise ValueError(f"reference scores must be (n, R>=1) with n = {signal_target.shape[0]}, got {out.shape}")
    mu = out.mean(axis=1)
    sigma = float((out - mu[:, None]).std()) if out.shape[1] > 1 else float(out.std())
    return (signal_target - mu) / (sigma if sigma > 0 else 1.0)


def lira_offline_scores(cs_target: np.ndarray, cs_references: np.ndarray) -> np.ndarray:
    """Offline LiRA with fixed variance on Fisher-z CS. cs_target (n,), cs_references (n, R) from OUT models."""
    return difficulty_calibrated(fisher_z(np.asarray(cs_target)), fisher_z(np.asarray(cs_references)))
