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


# --- AEA -----------------------------------------------------------------------------------------
from m4i_assets.attacks.aea import aea_scores, augmentation_deltas  # noqa: E402


def test_aea_default_is_clean_cs_plus_mean_delta():
    cs = np.array([0.9, 0.5])
    aug = np.array([[0.5, 0.7], [0.5, 0.4]])
    deltas = augmentation_deltas(cs, aug)
    np.testing.assert_allclose(deltas, [[0.4, 0.2], [0.0, 0.1]])
    np.testing.assert_allclose(aea_scores(cs, deltas), [0.9 + 0.3, 0.5 + 0.05])


def test_aea_separates_records_that_lose_similarity_under_augmentation():
    rng = np.random.default_rng(1)
    cs = np.full(200, 0.8) + 0.01 * rng.normal(size=200)  # clean CS alone cannot tell them apart
    drop = np.r_[np.full(100, 0.3), np.full(100, 0.05)][:, None] + 0.01 * rng.normal(size=(200, 8))
    deltas = augmentation_deltas(cs, cs[:, None] - drop)
    scores = aea_scores(cs, deltas)
    assert scores[:100].min() > scores[100:].max()
    from m4i_assets.metrics.evaluation import roc_auc

    assert roc_auc(np.arange(200) < 100, aea_scores(cs, deltas, "zscore")) > 0.8


def test_aea_rejects_unknown_aggregation_and_bad_shapes():
    with pytest.raises(ValueError, match="aggregation"):
        aea_scores(np.zeros(2), np.zeros((2, 3)), "median")
    with pytest.raises(ValueError, match="deltas"):
        aea_scores(np.zeros(2), np.zeros(3))


# --- WSA -----------------------------------------------------------------------------------------
from m4i_assets.attacks.wsa import WsaClassifier, pseudo_label, wsa_features  # noqa: E402


def test_pseudo_labels_use_mean_plus_lambda_std_of_known_nonmembers():
    known = np.array([0.0, 1.0, 2.0, 3.0])  # mean 1.5, std sqrt(1.25)
    labels = pseudo_label(np.array([1.0, 3.1, 3.5]), known, lam=1.5)
    assert labels.tau == pytest.approx(1.5 + 1.5 * np.sqrt(1.25))
    assert labels.is_pseudo_member.tolist() == [False, False, True]
    assert labels.error_rate(np.array([False, False, True])) == 0.0
    assert labels.error_rate(np.array([True, True, False])) == 1.0
    assert labels.rule == "threshold"


def test_pseudo_labels_fall_back_to_top_k_when_tau_keeps_too_few():
    known = np.r_[np.full(90, 0.9), np.full(10, 0.0)]  # a long lower tail inflates the std
    cands = np.array([0.91, 0.95, 0.2, 0.93, 0.5])
    assert not pseudo_label(cands, known, lam=1.5).is_pseudo_member.any()
    labels = pseudo_label(cands, known, lam=1.5, min_members=2)
    assert labels.rule == "top_k" and labels.is_pseudo_member.tolist() == [False, True, False, True, False]


def test_wsa_classifier_learns_a_separable_signal_and_round_trips():
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(1.0, 1.0, size=(150, 8)), rng.normal(-1.0, 1.0, size=(300, 8))]
    y = np.r_[np.ones(150), np.zeros(300)]
    clf = WsaClassifier(random_state=3).fit(X, y)
    p = clf.predict_proba(X)[:, 1]
    assert p[:150].mean() > 0.8 > 0.2 > p[150:].mean()
    assert len(clf.history_) <= 15
    again = WsaClassifier(random_state=3).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(again, clf.predict_proba(X))  # seeded
    np.testing.assert_allclose(WsaClassifier.from_bytes(clf.to_bytes()).predict_proba(X), clf.predict_proba(X))


def test_wsa_needs_both_classes():
    with pytest.raises(ValueError, match="at least 2"):
        WsaClassifier().fit(np.zeros((5, 2)), np.array([1, 0, 0, 0, 0]))
    assert wsa_features(np.ones((2, 3)), np.zeros((2, 3))).shape == (2, 6)


# --- reference-calibrated (offline LiRA) ---------------------------------------------------------
from m4i_assets.attacks.calibrated import lira_offline_scores  # noqa: E402


def test_lira_removes_per_record_difficulty():
    rng = np.random.default_rng(2)
    difficulty = rng.uniform(0.0, 0.8, size=400)  # some pairs align well under any model
    is_member = np.arange(400) < 200
    refs = difficulty[:, None] + 0.02 * rng.normal(size=(400, 4))
    target = difficulty + 0.05 * is_member + 0.02 * rng.normal(size=400)
    from m4i_assets.metrics.evaluation import roc_auc

    raw, calibrated = roc_auc(is_member, target), roc_auc(is_member, lira_offline_scores(target, refs))
    assert raw < 0.75 and calibrated > 0.9


def test_lira_checks_shapes():
    with pytest.raises(ValueError, match="reference scores"):
        lira_offline_scores(np.zeros(3), np.zeros((2, 4)))


# --- blind baseline ------------------------------------------------------------------------------
from m4i_assets.attacks.blind import blind_scores  # noqa: E402
from m4i_assets.data.corpus import CorpusSpec, generate  # noqa: E402


def _corpus(tmp_path, style, n=80, seed=0):
    import json

    manifest = generate(CorpusSpec(n_records=n, image_size=32, seed=seed, style=style), tmp_path / style)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    return [r["caption"] for r in rows], [str(manifest.parent / r["image"]) for r in rows]


def test_blind_baseline_is_at_chance_on_a_same_distribution_split(tmp_path):
    from m4i_assets.metrics.evaluation import evaluate_scores

    captions, images = _corpus(tmp_path, "default", n=200)
    labels = np.arange(200) % 2 == 0
    ev = evaluate_scores(labels, blind_scores(captions, images, labels, random_state=0), n_bootstrap=200)
    assert ev.ci_low["auc"] < 0.5 < ev.ci_high["auc"]


def test_blind_baseline_detects_a_shifted_nonmember_set(tmp_path):
    from m4i_assets.metrics.evaluation import roc_auc

    cap_a, img_a = _corpus(tmp_path, "default")
    cap_b, img_b = _corpus(tmp_path, "shifted", seed=1)
    labels = np.r_[np.ones(80, bool), np.zeros(80, bool)]
    assert roc_auc(labels, blind_scores(cap_a + cap_b, img_a + img_b, labels)) > 0.95
