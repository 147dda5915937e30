"""`clip_loss`: the contrastive loss of the matched pair (ATTACKS.md section 6).

CLIP is trained to maximise the InfoNCE log-probability of each matched (image, caption) pair against the
other pairs of its batch (Radford et al. 2021, section 2.3), so a member keeps a high log-probability of its
own caption against *any* negatives. The score of a record is the mean of its two InfoNCE terms,

    image -> text: log softmax_j (s cos(x, t_j)) at the matched t, over {t} and the negatives' captions,
    text -> image: the same with the roles of images and captions swapped,

with the known non-members' captions and images as the negatives (records the target never saw, from the
candidates' distribution) and s the model's logit scale (or a fixed 10). It needs no reference model: the
negatives turn CSA's raw similarity into a per-record relative one, which removes much of the per-record
difficulty that CSA keeps (an image that is close to many captions is not evidence of membership).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

DEFAULT_LOGIT_SCALE = 10.0


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def infonce_log_probs(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    negative_image_emb: np.ndarray,
    negative_text_emb: np.ndarray,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    exclude: np.ndarray | None = None,
    similarities=None,
) -> np.ndarray:
    """Per record, the mean of the image->text and text->image InfoNCE log-probabilities of its matched pair
    against the negatives (m of them). `exclude[i]` is the index of a negative to leave out of record i's
    terms (itself, when the records are the negatives; -1 for none). `similarities`, when given, maps a
    similarity array to what the model releases (a release-time defense's rounding)."""
    a, b = _unit(image_emb), _unit(text_emb)
    na, nb = _unit(negative_image_emb), _unit(negative_text_emb)
    if a.shape != b.shape or na.shape != nb.shape or a.shape[1] != na.shape[1]:
        raise ValueError(f"embedding shapes differ: {a.shape}, {b.shape}, negatives {na.shape}, {nb.shape}")
    if len(na) == 0:
        raise ValueError("clip_loss needs at least one negative (known non-member)")
    release = similarities or (lambda s: s)
    pos = logit_scale * release(np.einsum("ij,ij->i", a, b))
    i2t = logit_scale * release(a @ nb.T)
    t2i = logit_scale * release(b @ na.T)
    if exclude is not None:
        rows = np.flatnonzero(np.asarray(exclude) >= 0)
        cols = np.asarray(exclude)[rows]
        i2t[rows, cols] = -np.inf
        t2i[rows, cols] = -np.inf
    lp_i2t = pos - logsumexp(np.c_[pos, i2t], axis=1)
    lp_t2i = pos - logsumexp(np.c_[pos, t2i], axis=1)
    return (lp_i2t + lp_t2i) / 2


def clip_loss_scores(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    negative_image_emb: np.ndarray,
    negative_text_emb: np.ndarray,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    similarities=None,
) -> np.ndarray:
    """Membership score of each candidate: its matched pair's InfoNCE log-probability (higher = member)."""
    return infonce_log_probs(image_emb, text_emb, negative_image_emb, negative_text_emb, logit_scale,
                             similarities=similarities)  # fmt: skip


def self_excluded_log_probs(
    image_emb: np.ndarray, text_emb: np.ndarray, logit_scale: float = DEFAULT_LOGIT_SCALE, similarities=None
) -> np.ndarray:
    """The same log-probability for the negatives themselves, each against all the others (RMIA's population)."""
    return infonce_log_probs(image_emb, text_emb, image_emb, text_emb, logit_scale, np.arange(len(image_emb)),
                             similarities)  # fmt: skip
