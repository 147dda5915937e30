"""Blind baseline: a membership classifier that never queries the model (Das et al. 2024, "Blind
Baselines Beat Membership Inference Attacks for Foundation Models").

It sees only model-free features of each record: caption text (word and bigram TF-IDF plus length
statistics), image statistics (per-channel mean and spread, brightness, edge energy, size, file
bytes). Scores are out-of-fold P(member) from repeated stratified k-fold cross-validation with a
seeded logistic regression. If this baseline is well above chance, member and non-member sets differ in
distribution and any attack's AUC measures that shift, not membership (README, Rules of evidence).
"""

import io
import re

import numpy as np
from PIL import Image
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.preprocessing import StandardScaler

from m4i_assets.data.images import read_image_bytes, to_rgb

IMAGE_STAT_SIZE = 64


def caption_statistics(captions: list[str]) -> np.ndarray:
    """Per caption: characters, words, distinct words, mean word length, digits, punctuation marks."""
    rows = []
    for c in captions:
        words = c.split()
        rows.append([
            len(c), len(words), len(set(words)), np.mean([len(w) for w in words]) if words else 0.0,
            sum(ch.isdigit() for ch in c), len(re.findall(r"[^\w\s]", c)),
        ])  # fmt: skip
    return np.asarray(rows, dtype=np.float64)


def image_statistics(image_uris: list[str]) -> np.ndarray:
    """Per image: channel means and stds, brightness, edge energy, width, height, file bytes."""
    rows = []
    for uri in image_uris:
        data = read_image_bytes(uri)
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            rgb = np.asarray(to_rgb(im).resize((IMAGE_STAT_SIZE, IMAGE_STAT_SIZE)), dtype=np.float64) / 255
        grey = rgb.mean(axis=2)
        edges = np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()
        rows.append([*rgb.mean(axis=(0, 1)), *rgb.std(axis=(0, 1)), grey.mean(), edges, width, height,
                     len(data)])  # fmt: skip
    return np.asarray(rows, dtype=np.float64)


def blind_scores(
    captions: list[str],
    image_uris: list[str],
    is_member: np.ndarray,
    n_folds: int = 5,
    n_repeats: int = 5,
    random_state: int = 0,
    features: np.ndarray | None = None,
    others: tuple[list[str], list[str], np.ndarray | None] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Out-of-fold P(member) for each record from model-free features only, averaged over
    `n_repeats` repetitions of stratified k-fold (which split a record lands in is itself noise:
    on the demo's split one 5-fold run ranged from AUC 0.46 to 0.49 across seeds).

    `features` (n, f): more target-independent features per record (e.g. a reference model's embeddings).
    `others` (captions, image uris, features) are records outside the labelled set (known non-members): each
    fold's model scores them too, and (scores, other scores averaged over every fold) is returned."""
    y = np.asarray(is_member, dtype=int)
    numeric = np.c_[caption_statistics(captions), image_statistics(image_uris)]
    if features is not None:
        numeric = np.c_[numeric, features]
    if others is not None:
        other_numeric = np.c_[caption_statistics(others[0]), image_statistics(others[1])]
        if features is not None:
            other_numeric = np.c_[other_numeric, others[2]]
        other_scores = np.zeros(len(others[0]))
    folds = RepeatedStratifiedKFold(n_splits=n_folds, n_repeats=n_repeats, random_state=random_state)
    scores = np.zeros(len(y), dtype=np.float64)
    for train, test in folds.split(numeric, y):
        text = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        scale = StandardScaler()
        X_train = sparse.hstack([text.fit_transform([captions[i] for i in train]), scale.fit_transform(numeric[train])])
        X_test = sparse.hstack([text.transform([captions[i] for i in test]), scale.transform(numeric[test])])
        clf = LogisticRegression(C=1.0, max_iter=5000, random_state=random_state).fit(X_train.tocsr(), y[train])
        scores[test] += clf.predict_proba(X_test.tocsr())[:, 1] / n_repeats
        if others is not None:
            X_other = sparse.hstack([text.transform(others[0]), scale.transform(other_numeric)])
            other_scores += clf.predict_proba(X_other.tocsr())[:, 1] / (n_folds * n_repeats)
    return scores if others is None else (scores, other_scores)


def known_vs_candidate_scores(
    candidates: tuple[list[str], list[str], np.ndarray | None],
    known: tuple[list[str], list[str], np.ndarray | None],
    n_folds: int,
    random_state: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The shift gate's second test (Das et al. 2024): the blind classifier telling the known non-members from the
    candidate non-members, each given as (captions, image uris, target-independent features or None). Returns
    (is_known, out-of-fold P(known)) over candidates then known non-members; an AUC above chance means the known
    non-members, on which WSA and the known-threshold figures rest, are not like the candidates."""
    is_known = np.r_[np.zeros(len(candidates[0]), bool), np.ones(len(known[0]), bool)]
    features = None if candidates[2] is None else np.r_[candidates[2], known[2]]
    scores = blind_scores(candidates[0] + known[0], candidates[1] + known[1], is_known, n_folds=n_folds,
                          random_state=random_state, features=features)  # fmt: skip
    return is_known, scores
