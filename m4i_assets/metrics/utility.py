"""Model utility on held-out data: the utility side of privacy-utility curves for defended models.

For CLIP models: image-to-text and text-to-image retrieval recall@k over matched pairs (the
Flickr30k / MSCOCO retrieval protocol, as CLIP reports it; Radford et al. 2021) and zero-shot
classification accuracy with prompt ensembling (Radford et al. 2021, section 3.1.4), on a task whose
labels exist in the embedded corpus (`data.corpus.zero_shot_task`, `data.corpus.zero_shot_prompts`). For
captioners: BLEU-4, ROUGE-L and CIDEr means from the project's caption metrics (`m4i_assets.metrics.captions`).

Everything is deterministic; ties in similarity are broken pessimistically (a tie with a wrong item
counts against the query), so a degenerate model that maps everything to one point scores 0 rather
than a lucky recall.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from m4i_assets.metrics.captions import caption_metric_features

_CHUNK = 512  # query rows per similarity block: 512 x 5000 float64 is 20 MB


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows (last axis) scaled to unit L2 norm, float64; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float64).tiny)


def _group_codes(groups: Sequence[str] | None, n: int) -> np.ndarray:
    """Group index 0..G-1 per row, in order of first appearance; each row its own group when `groups` is None."""
    if groups is None:
        return np.arange(n)
    if isinstance(groups, str) or len(groups) != n:
        raise ValueError(f"groups must be a sequence with one entry per pair ({n})")
    index: dict[str, int] = {}
    return np.array([index.setdefault(g, len(index)) for g in groups], dtype=np.int64)


def retrieval_recall(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    groups: Sequence[str] | None = None,
    released: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
    """Image-to-text and text-to-image retrieval recall@k over held-out matched pairs (Radford et al. 2021).

    `released` maps a block of cosine similarities to what the model releases (elementwise, e.g.
    `Release.similarities`, which rounds them under similarity rounding), so utility is measured at the
    release's interface; None: the cosines themselves.

    Row i of `image_emb` and row i of `text_emb` are a matched pair; similarity is the cosine (rows
    are L2-normalised here). Returns `i2t_recall@k` then `t2i_recall@k` for every k in `ks`.

    `groups` (one per pair, e.g. image ids) says which pairs share an image, COCO-style (about five
    captions per image, one pair each); without it every pair is its own group. Within a group the
    image rows are one image (possibly released with different noise), the text rows distinct captions:

    - image-to-text: each image row queries all n texts and is correct at k when some text of its
      group ranks in the top k; the recall is the mean over groups of the mean over the group's rows
      (with identical rows per group: the mean over distinct images, as in COCO).
    - text-to-image: each text queries the distinct images, a group scoring as its best image row, and
      is correct at k when its group ranks in the top k; the recall is the mean over texts.

    Ties are pessimistic and deterministic: a query's rank is 1 + the number of wrong candidates whose
    similarity is >= that of its best correct candidate, so a tie with a wrong item counts against it.
    Vectorised in blocks of query rows (n = 5000 pairs of 512-d embeddings: one to two seconds on 2 cores).
    """
    img = _normalise(image_emb)
    txt = _normalise(text_emb)
    if img.ndim != 2 or img.shape != txt.shape or img.shape[0] == 0:
        raise ValueError(
            f"image_emb and text_emb must be non-empty (n, d) arrays of one shape, got {img.shape} and {txt.shape}"
        )
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be integers >= 1, got {ks}")
    release = released or (lambda sim: sim)
    n = img.shape[0]
    code = _group_codes(groups, n)
    n_groups = int(code.max()) + 1
    # Columns of the image side sorted by group, and where each group's run starts (for group maxima).
    order = np.argsort(code, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(code[order])) + 1]

    i2t_wrong = np.empty(n, dtype=np.int64)  # wrong texts scoring >= the best text of the query's group
    t2i_wrong = np.empty(n, dtype=np.int64)  # wrong groups scoring >= the query's own group
    for lo in range(0, n, _CHUNK):
        rows = np.arange(lo, min(lo + _CHUNK, n))
        q_code = code[rows]
        sim = release(img[rows] @ txt.T)
        same = code[None, :] == q_code[:, None]
        best = np.where(same, sim, -np.inf).max(axis=1)
        i2t_wrong[rows] = ((sim >= best[:, None]) & ~same).sum(axis=1)

        group_sim = np.maximum.reduceat(release(txt[rows] @ img.T)[:, order], starts, axis=1)  # (q, n_groups)
        own = group_sim[np.arange(len(rows)), q_code]
        t2i_wrong[rows] = (group_sim >= own[:, None]).sum(axis=1) - 1

    group_size = np.bincount(code, minlength=n_groups)
    out: dict[str, float] = {}
    for k in ks:
        per_group = np.bincount(code, weights=(i2t_wrong < k).astype(np.float64), minlength=n_groups) / group_size
        out[f"i2t_recall@{k}"] = float(per_group.mean())
    for k in ks:
        out[f"t2i_recall@{k}"] = float((t2i_wrong < k).mean())
    return out


def zero_shot_accuracy(
    image_emb: np.ndarray, class_text_emb: np.ndarray, labels: Sequence[int | None],
    released: Callable[[np.ndarray], np.ndarray] | None = None,
) -> float:  # fmt: skip
    """Zero-shot classification accuracy (Radford et al. 2021, section 3.1.4, with prompt ensembling).

    Image i is predicted as argmax_j cos(image_i, class_j). `class_text_emb` is (n_classes, d), one
    prompt embedding per class, or (n_classes, n_prompts, d): each prompt embedding is L2-normalised,
    the class embedding is their mean, re-normalised (CLIP's embedding-space ensembling). `labels[i]`
    is image i's class index; images labelled None are left out. Pessimistic ties: an image is correct
    only when its class scores strictly above every other class. Raises ValueError when no image is
    labelled or a label is out of range. `released`: as for `retrieval_recall` (the image-class similarities
    the model releases).
    """
    img = _normalise(image_emb)
    cls = np.asarray(class_text_emb, dtype=np.float64)
    if cls.ndim == 3:
        cls = _normalise(_normalise(cls).mean(axis=1))
    elif cls.ndim == 2:
        cls = _normalise(cls)
    else:
        raise ValueError(f"class_text_emb must be (n_classes, d) or (n_classes, n_prompts, d), got {cls.shape}")
    if img.ndim != 2 or img.shape[1] != cls.shape[1] or len(labels) != img.shape[0]:
        raise ValueError(
            f"image_emb (n, d) must match class_text_emb's d and have one label per row: got {img.shape}, "
            f"{cls.shape} and {len(labels)} labels"
        )
    kept = np.array([i for i, y in enumerate(labels) if y is not None], dtype=np.int64)
    if kept.size == 0:
        raise ValueError("no image has a label")
    y = np.array([labels[i] for i in kept], dtype=np.int64)
    if y.min() < 0 or y.max() >= cls.shape[0]:
        raise ValueError(f"labels must be class indices in [0, {cls.shape[0]})")
    scores = img[kept] @ cls.T
    if released is not None:
        scores = np.array(released(scores), dtype=np.float64)
    rows = np.arange(kept.size)
    own = scores[rows, y].copy()
    scores[rows, y] = -np.inf
    return float((own > scores.max(axis=1)).mean())


def caption_utility(generated: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Captioner utility on held-out records: means over records of BLEU-4, ROUGE-L and CIDEr(-D).

    Computed with `m4i_assets.metrics.captions.caption_metric_features` (its tokenisation, multi-reference
    averaging and libraries). BLEU-4 is the mean of sentence-level BLEU-4, not the COCO evaluation's
    corpus BLEU pooling n-gram counts; CIDEr's document frequencies come from the references passed
    in, so pass every held-out record in one call. Returns keys `bleu4`, `rougeL`, `cider`.
    """
    metrics = ("bleu4", "rougeL", "cider")
    if len(generated) == 0:
        raise ValueError("caption_utility needs at least one record")
    features = caption_metric_features(
        list(generated), [r if isinstance(r, str) else list(r) for r in references], metrics
    )
    return {name: float(features[:, j].mean()) for j, name in enumerate(metrics)}


def retrieval_chance(ks: Sequence[int], n_texts: int, n_images: int) -> dict[str, float]:
    """Recall@k of a model that ranks at random: k over the gallery size (texts for image-to-text, distinct
    images for text-to-image), the floor beside which a retrieval figure means something."""
    if n_texts < 1 or n_images < 1:
        raise ValueError(f"galleries must be non-empty, got {n_texts} texts and {n_images} images")
    return {
        **{f"i2t_recall@{k}": min(1.0, k / n_texts) for k in ks},
        **{f"t2i_recall@{k}": min(1.0, k / n_images) for k in ks},
    }


def zero_shot_chance(n_classes: int) -> float:
    """Accuracy of a zero-shot classifier that guesses: one over the number of classes."""
    if n_classes < 1:
        raise ValueError(f"need at least one class, got {n_classes}")
    return 1.0 / n_classes


def caption_chance(references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The caption metrics of a captioner that ignores its image: each held-out record captioned with the first
    reference of the next record (in the given order, cyclically), scored like a model's captions. Needs two
    records or more."""
    if len(references) < 2:
        raise ValueError("caption_chance needs at least two records")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    return caption_utility([refs[(i + 1) % len(refs)][0] for i in range(len(refs))], refs)
