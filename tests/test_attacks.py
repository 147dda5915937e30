import numpy as np
import pytest

from m4i_assets.attacks.csa import cosine_similarity, csa_scores


def test_csa_is_rowwise_cosine_of_hand_made_embeddings():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    txt = np.array([[2.0, 0.0], [1.0, 0.0], [-3.0, -4.0]])
    np.testing.assert_allclose(csa_scores(img, txt), [1.0, 0.0, -1.0])


def test_csa_ranks_aligned_pairs_above_unaligned():
    rng = np.random.default_rng(0)
    txt = rng.normal(size=(100, 16))
    members = txt[:50] + 0.1 * rng.normal(size=(50, 16))  # memorised: image close to its caption
    nonmembers = rng.normal(size=(50, 16))
    scores = csa_scores(np.r_[members, nonmembers], txt)
    assert scores[:50].min() > scores[50:].max()


def test_cosine_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_similarity(np.zeros((2, 3)), np.zeros((2, 4)))
