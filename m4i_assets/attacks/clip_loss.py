"""`clip_loss`: the model's own pairing loss of the matched pair (README, Choices where the papers are silent).

A dual encoder is trained to score each matched (image, caption) pair above the other pairs of its batch, so
a member keeps a high score of its own caption against *any* negatives. The score of a record is its pair's
log-likelihood under the objective the model was trained with (`models.clip.Objective`), with the known
non-members' captions and images as the negatives (records the target never saw, from the candidates'
distribution) and z = s cos + b the logit of a pair, s the model's logit scale (or a fixed 10) and b its bias:

- softmax (CLIP, Radford et al. 2021, section 2.3): the mean of the record's two InfoNCE terms,

      image -> text: log softmax_j (s cos(x, t_j)) at the matched t, over {t} and the negatives' captions,
      text -> image: the same with the roles of images and captions swapped;

- sigmoid (SigLIP, Zhai et al. 2023): SigLIP trains every (image, caption) pair of a batch as its own binary
  question, "is this a matched pair?", with probability sigmoid(z) of yes (z = s cos + b: scale AND bias).
  The record's row of that loss is log sigmoid(z_ii) for its matched pair plus log sigmoid(-z_ij) for each
  negative j, and its column the same with images and captions swapped. Summed, the m negatives would
  outweigh the one matched pair m to 1 and the value would grow with the number of known non-members, so
  each direction gives the matched term and the *mean* of the negative terms equal weight:

      image -> text: ( log sigmoid(z(x, t)) + mean_j log sigmoid(-z(x, t_j)) ) / 2,
      text -> image: ( log sigmoid(z(x, t)) + mean_j log sigmoid(-z(x_j, t)) ) / 2,

  and the score is the mean of the two directions: the log of a geometric mean of the probabilities the model
  gives the record's pair labels (its own pair matched, the negatives not), the matched pair weighing half.

Either way a record's value lies in (-inf, 0] and its exp is a probability-like number in (0, 1], the
probability RMIA's likelihood ratio divides (`attacks.rmia`), and it does not depend on the number of
negatives in scale. It needs no reference model: the negatives turn CSA's raw similarity into a per-record
relative one, which removes much of the per-record difficulty that CSA keeps (an image that is close to many
captions is not evidence of membership).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

DEFAULT_LOGIT_SCALE = 10.0
OBJECTIVES = ("softmax", "sigmoid")  # `models.clip.Objective.kind`


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pair_similarities(image_emb, text_emb, negative_image_emb, negative_text_emb, similarities):
    """Released cosine similarities of the matched pairs (n,), of each image with the negatives' captions and of
    each caption with the negatives' images (n, m)."""
    a, b = _unit(image_emb), _unit(text_emb)
    na, nb = _unit(negative_image_emb), _unit(negative_text_emb)
    if a.shape != b.shape or na.shape != nb.shape or a.shape[1] != na.shape[1]:
        raise ValueError(f"embedding shapes differ: {a.shape}, {b.shape}, negatives {na.shape}, {nb.shape}")
    if len(na) == 0:
        raise ValueError("clip_loss needs at least one negative (known non-member)")
    release = similarities or (lambda s: s)
    return release(np.einsum("ij,ij->i", a, b)), release(a @ nb.T), release(b @ na.T)


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


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
    cosines = _pair_similarities(image_emb, text_emb, negative_image_emb, negative_text_emb, similarities)
    pos, i2t, t2i = (logit_scale * c for c in cosines)
    if exclude is not None:
        rows = np.flatnonzero(np.asarray(exclude) >= 0)
        cols = np.asarray(exclude)[rows]
        i2t[rows, cols] = -np.inf
        t2i[rows, cols] = -np.inf
    lp_i2t = pos - logsumexp(np.c_[pos, i2t], axis=1)
    lp_t2i = pos - logsumexp(np.c_[pos, t2i], axis=1)
    return (lp_i2t + lp_t2i) / 2


def sigmoid_log_probs(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    negative_image_emb: np.ndarray,
    negative_text_emb: np.ndarray,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    logit_bias: float = 0.0,
    exclude: np.ndarray | None = None,
    similarities=None,
) -> np.ndarray:
    """Per record, the sigmoid (SigLIP) counterpart of `infonce_log_probs` (the module docstring's formula):
    the mean over both directions of (log sigmoid(z_ii) + mean_j log sigmoid(-z_ij)) / 2, z = scale cos +
    bias, against the negatives (m of them). `exclude` and `similarities` as for `infonce_log_probs`."""
    cosines = _pair_similarities(image_emb, text_emb, negative_image_emb, negative_text_emb, similarities)
    pos, i2t, t2i = (logit_scale * c + logit_bias for c in cosines)
    keep = np.ones(i2t.shape, dtype=bool)
    if exclude is not None:
        rows = np.flatnonzero(np.asarray(exclude) >= 0)
        keep[rows, np.asarray(exclude)[rows]] = False
    counts = keep.sum(axis=1)
    if (counts == 0).any():
        raise ValueError("clip_loss needs at least one negative (known non-member) per record")
    matched = _log_sigmoid(pos)
    negatives = [np.where(keep, _log_sigmoid(-z), 0.0).sum(axis=1) / counts for z in (i2t, t2i)]
    return (2 * matched + negatives[0] + negatives[1]) / 4


def pair_log_probs(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    negative_image_emb: np.ndarray,
    negative_text_emb: np.ndarray,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    exclude: np.ndarray | None = None,
    similarities=None,
    *,
    objective: str = "softmax",
    logit_bias: float = 0.0,
) -> np.ndarray:
    """The matched pair's log-likelihood under the model's `objective`: `infonce_log_probs` (softmax; a bias
    cancels in it) or `sigmoid_log_probs` (sigmoid, with `logit_bias`)."""
    if objective == "softmax":
        return infonce_log_probs(
            image_emb, text_emb, negative_image_emb, negative_text_emb, logit_scale, exclude, similarities
        )
    if objective == "sigmoid":
        return sigmoid_log_probs(
            image_emb, text_emb, negative_image_emb, negative_text_emb, logit_scale, logit_bias, exclude, similarities
        )
    raise ValueError(f"unknown pairing objective {objective!r}; expected one of {OBJECTIVES}")


def clip_loss_scores(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    negative_image_emb: np.ndarray,
    negative_text_emb: np.ndarray,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    similarities=None,
    *,
    objective: str = "softmax",
    logit_bias: float = 0.0,
) -> np.ndarray:
    """Membership score of each candidate: its matched pair's log-likelihood under the model's objective
    (InfoNCE log-probability for softmax, `sigmoid_log_probs` for sigmoid; higher = member)."""
    return pair_log_probs(
        image_emb,
        text_emb,
        negative_image_emb,
        negative_text_emb,
        logit_scale,
        similarities=similarities,
        objective=objective,
        logit_bias=logit_bias,
    )


def self_excluded_log_probs(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    similarities=None,
    *,
    objective: str = "softmax",
    logit_bias: float = 0.0,
) -> np.ndarray:
    """The same log-likelihood for the negatives themselves, each against all the others (RMIA's population)."""
    return pair_log_probs(
        image_emb,
        text_emb,
        image_emb,
        text_emb,
        logit_scale,
        np.arange(len(image_emb)),
        similarities,
        objective=objective,
        logit_bias=logit_bias,
    )
