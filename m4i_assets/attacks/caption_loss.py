"""Likelihood attacks on image captioners (README, Choices where the papers are silent).

`m4i_loss`: the teacher-forced negative log-likelihood of the record's reference caption given its image
under the target (mean over the caption's tokens); training minimises exactly this on the members, so
members have lower loss (Yeom et al., CSF 2018, the loss attack). Score = -NLL.
`m4i_loss_ref`: the same, calibrated by OUT captioners (the shadow captioners, none of which saw a candidate;
the null control is one too, but it is audited beside the target, not learnt from): score = difficulty
calibration of -NLL against their mean; in the scenario table, once per shadow (Watson et al., ICLR 2022;
`attacks.calibrated.difficulty_calibrated`). Unlike MB/FB M^4I, both need white-box access to the target's
token probabilities, not just its generated caption.
"""

import numpy as np

from m4i_assets.attacks.calibrated import difficulty_calibrated

LOSS, LOSS_REF = "m4i_loss", "m4i_loss_ref"


def loss_scores(nll_target: np.ndarray) -> np.ndarray:
    """m4i_loss: minus the target's per-record caption NLL (higher = more likely member)."""
    return -np.asarray(nll_target, dtype=np.float64)


def loss_ref_scores(nll_target: np.ndarray, nll_references: np.ndarray) -> np.ndarray:
    """m4i_loss_ref: -NLL on the target against -NLL on OUT captioners (n, R), globally standardised."""
    return difficulty_calibrated(-np.asarray(nll_target, dtype=np.float64), -np.asarray(nll_references))
