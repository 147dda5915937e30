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


def test_aea_mean_is_clean_cs_plus_mean_delta():
    cs = np.array([0.9, 0.5])
    aug = np.array([[0.5, 0.7], [0.5, 0.4]])
    deltas = augmentation_deltas(cs, aug)
    np.testing.assert_allclose(deltas, [[0.4, 0.2], [0.0, 0.1]])
    np.testing.assert_allclose(aea_scores(cs, deltas, "mean"), [0.9 + 0.3, 0.5 + 0.05])


def test_aea_separates_records_that_lose_similarity_under_augmentation():
    rng = np.random.default_rng(1)
    cs = np.full(200, 0.8) + 0.01 * rng.normal(size=200)  # clean CS alone cannot tell them apart
    drop = np.r_[np.full(100, 0.3), np.full(100, 0.05)][:, None] + 0.01 * rng.normal(size=(200, 8))
    deltas = augmentation_deltas(cs, cs[:, None] - drop)
    scores = aea_scores(cs, deltas, "mean")
    assert scores[:100].min() > scores[100:].max()
    from m4i_assets.metrics.evaluation import roc_auc

    known_cs = np.full(100, 0.8) + 0.01 * rng.normal(size=100)
    known = augmentation_deltas(known_cs, known_cs[:, None] - 0.05 - 0.01 * rng.normal(size=(100, 8)))
    for aggregation in ("known_zscore", "known_lr"):
        assert roc_auc(np.arange(200) < 100, aea_scores(cs, deltas, aggregation, known_cs, known)) > 0.95


def test_aea_rejects_unknown_aggregation_and_bad_shapes():
    with pytest.raises(ValueError, match="aggregation"):
        aea_scores(np.zeros(2), np.zeros((2, 3)), "median")
    with pytest.raises(ValueError, match="known non-members"):
        aea_scores(np.zeros(2), np.zeros((2, 3)), "known_lr")
    with pytest.raises(ValueError, match="deltas"):
        aea_scores(np.zeros(2), np.zeros(3), "mean")


# --- WSA -----------------------------------------------------------------------------------------
from m4i_assets.attacks.wsa import WsaClassifier, pseudo_label, wsa_features  # noqa: E402


def test_pseudo_labels_use_mean_plus_lambda_std_of_known_nonmembers():
    known = np.array([0.0, 1.0, 2.0, 3.0])  # mean 1.5, std sqrt(1.25)
    labels = pseudo_label(np.array([1.0, 3.1, 3.5]), known, rule="gaussian", lam=1.5)
    assert labels.tau == pytest.approx(1.5 + 1.5 * np.sqrt(1.25))
    assert labels.is_pseudo_member.tolist() == [False, False, True]
    assert labels.error_rate(np.array([False, False, True])) == 0.0
    assert labels.error_rate(np.array([True, True, False])) == 1.0
    assert labels.rule == "gaussian"


def test_pseudo_labels_fall_back_to_top_k_when_tau_keeps_too_few():
    known = np.r_[np.full(90, 0.9), np.full(10, 0.0)]  # a long lower tail inflates the std
    cands = np.array([0.91, 0.95, 0.2, 0.93, 0.5])
    assert not pseudo_label(cands, known, rule="gaussian", lam=1.5).is_pseudo_member.any()
    labels = pseudo_label(cands, known, rule="gaussian", lam=1.5, min_members=2)
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


def test_attack_classifiers_are_scikit_learn_estimators():
    """clone, get_params and cross-fitting with sklearn.model_selection work on the attack classifiers, and a
    second fit starts over (same data, same fitted model; no history carried over)."""
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError
    from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score

    from m4i_assets.attacks.m4i import ShadowClassifier

    rng = np.random.default_rng(1)
    X = np.r_[rng.normal(1.0, 1.0, size=(60, 4)), rng.normal(-1.0, 1.0, size=(60, 4))].astype(np.float32)
    y = np.r_[np.ones(60, int), np.zeros(60, int)]
    wsa = WsaClassifier(max_epochs=4, random_state=2)
    twin = clone(wsa)
    assert twin is not wsa and twin.get_params() == wsa.get_params() and twin.get_params()["max_epochs"] == 4
    with pytest.raises(NotFittedError):
        twin.predict_proba(X)
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    p = cross_val_predict(wsa, X, y, cv=folds, method="predict_proba")[:, 1]
    assert p.shape == (120,) and p[:60].mean() > p[60:].mean() + 0.3  # every record scored out of fold
    assert not hasattr(wsa, "model_")  # cross-fitting fits clones, never the template
    first = wsa.fit(X, y).predict_proba(X)
    history = list(wsa.history_)
    np.testing.assert_array_equal(wsa.fit(X, y).predict_proba(X), first)
    assert wsa.history_ == history
    shadow = ShadowClassifier(kinds=["logreg"], random_state=0)
    assert clone(shadow).get_params() == shadow.get_params()
    assert cross_val_score(shadow, X, y.astype(bool), cv=folds).mean() > 0.8


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


def test_known_vs_candidate_scores_tell_a_shifted_known_set_apart(tmp_path):
    from m4i_assets.attacks.blind import known_vs_candidate_scores
    from m4i_assets.metrics.evaluation import roc_auc

    cap_a, img_a = _corpus(tmp_path, "default")
    cap_b, img_b = _corpus(tmp_path, "shifted", seed=1)
    is_known, scores = known_vs_candidate_scores((cap_a, img_a, None), (cap_b, img_b, None), 5, 0)
    assert is_known.sum() == 80 and not is_known[:80].any() and roc_auc(is_known, scores) > 0.95
    extra = np.zeros((80, 2))
    with_features = known_vs_candidate_scores((cap_a, img_a, extra), (cap_b, img_b, extra), 5, 0)[1]
    assert with_features.shape == (160,)


def test_wide_deltas_orders_records_and_transforms():
    import polars as pl

    from m4i_assets.attacks.aea import wide_deltas

    deltas = pl.DataFrame({"record_id": ["b", "b", "a", "a"], "transform": ["t2", "t1", "t1", "t2"],
                           "cs_clean": [0.5, 0.5, 0.9, 0.9], "delta": [0.2, 0.1, 0.3, 0.4]})  # fmt: skip
    cs, wide = wide_deltas(deltas, pl.Series(["a", "b"]))
    np.testing.assert_array_equal(cs, [0.9, 0.5])
    np.testing.assert_array_equal(wide, [[0.3, 0.4], [0.1, 0.2]])
    with pytest.raises(ValueError, match="lack some records"):
        wide_deltas(deltas, pl.Series(["a", "c"]))


def test_aea_known_aggregations_do_not_depend_on_the_candidates_member_share():
    rng = np.random.default_rng(4)
    known_cs, known_d = rng.normal(0.5, 0.1, 300), rng.normal(0.1, 0.05, (300, 5))
    cs, d = rng.normal(0.6, 0.1, 50), rng.normal(0.2, 0.05, (50, 5))
    for aggregation in ("known_zscore", "known_lr"):
        alone = aea_scores(cs[:10], d[:10], aggregation, known_cs, known_d)
        with_others = aea_scores(cs, d, aggregation, known_cs, known_d)[:10]
        np.testing.assert_allclose(alone, with_others)


def test_aea_likelihood_ratio_is_the_whitened_sum_of_standardised_features():
    rng = np.random.default_rng(5)
    kcs, kd = rng.normal(0.5, 0.1, 300), rng.normal(0.1, 0.05, (300, 3))
    kd[:, 1] += 0.5 * (kcs - 0.5)  # a delta correlated with CS
    cs, d = rng.normal(0.6, 0.1, 20), rng.normal(0.2, 0.05, (20, 3))
    from sklearn.covariance import LedoitWolf

    known = np.c_[kcs, kd]
    mu, sd = known.mean(0), known.std(0)
    cov = LedoitWolf().fit((known - mu) / sd).covariance_
    expected = ((np.c_[cs, d] - mu) / sd) @ np.linalg.solve(cov, np.ones(4))
    np.testing.assert_allclose(aea_scores(cs, d, "known_lr", kcs, kd), expected)
    z = (np.c_[cs, d] - mu) / sd
    np.testing.assert_allclose(aea_scores(cs, d, "known_zscore", kcs, kd), z[:, 0] + z[:, 1:].mean(1))


# --- WSA: tau rules, features, cross-fitting ------------------------------------------------------
from m4i_assets.attacks.wsa import CrossFittedWsa, folds_of, threshold  # noqa: E402


def test_quantile_tau_passes_alpha_of_the_known_nonmembers_whatever_their_skew():
    rng = np.random.default_rng(6)
    known = 1 - rng.exponential(0.1, size=1000)  # left-skewed like the demo's
    tau = threshold(known, "quantile", alpha=0.05)
    assert (known >= tau).mean() == pytest.approx(0.05, abs=0.002)
    assert threshold(known, "gaussian", lam=1.5) > known.max() - 0.01  # the Gaussian rule overshoots
    with pytest.raises(ValueError, match="tau rule"):
        threshold(known, "median")


def test_pseudo_label_error_rate_over_the_training_set():
    labels = pseudo_label(np.array([0.9, 0.95, 0.2]), np.array([0.1, 0.2, 0.3, 0.4]), alpha=0.25)
    is_member = np.array([True, False, False])
    assert labels.error_rate(is_member) == 0.5  # one of two pseudo-members is wrong
    assert labels.training_set_error_rate(is_member, 4) == pytest.approx(1 / 6)  # 2 pseudo + 4 known


def test_wsa_features_kinds():
    img, txt = np.array([[3.0, 4.0]]), np.array([[1.0, 0.0]])
    assert wsa_features(img, txt).shape == (1, 4)
    np.testing.assert_allclose(wsa_features(img, txt, ("product", "cs")), [[0.6, 0.0, 0.6]])
    np.testing.assert_allclose(wsa_features(img, txt, ("deltas",), deltas=np.array([[0.1, 0.2]])), [[0.1, 0.2]])
    with pytest.raises(ValueError, match="deltas"):
        wsa_features(img, txt, ("deltas",))
    with pytest.raises(ValueError, match="unknown WSA features"):
        wsa_features(img, txt, ("pixels",))


def test_cross_fitted_wsa_never_scores_a_record_with_a_model_fit_on_it():
    """A memorising classifier scores its training records near 1. With pure-noise features, the
    in-sample scores of pseudo-members separate them; cross-fitted scores do not."""
    rng = np.random.default_rng(7)
    n = 200
    X, X_known = rng.normal(size=(n, 128)), rng.normal(size=(100, 128))
    pseudo = np.arange(n) < 100  # labels carry no signal about the features
    folds = folds_of(n, 5, seed=0)
    assert sorted(np.bincount(folds)) == [40] * 5
    wsa = CrossFittedWsa.fit(X, pseudo, X_known, folds, folds_of(100, 5, seed=1), random_state=0)
    from m4i_assets.metrics.evaluation import roc_auc

    in_sample = WsaClassifier(random_state=0).fit(np.r_[X[pseudo], X_known], np.r_[np.ones(100), np.zeros(100)])
    assert roc_auc(pseudo, in_sample.predict_proba(X)[:, 1]) > 0.75
    assert abs(roc_auc(pseudo, wsa.score(X)) - 0.5) < 0.06
    again = CrossFittedWsa.from_bytes(wsa.to_bytes())
    np.testing.assert_allclose(again.score(X), wsa.score(X), atol=1e-6)
    np.testing.assert_allclose(again.score_known(X_known), wsa.score_known(X_known), atol=1e-6)
    with pytest.raises(ValueError, match="folds"):
        folds_of(3, 5, 0)


# --- clip_loss and RMIA --------------------------------------------------------------------------
from m4i_assets.attacks.clip_loss import clip_loss_scores, infonce_log_probs, self_excluded_log_probs  # noqa: E402
from m4i_assets.attacks.rmia import offline_marginal, rmia_scores  # noqa: E402


def test_clip_loss_is_the_infonce_log_probability_of_the_matched_pair():
    img, txt = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]])
    neg_img, neg_txt = np.array([[0.0, 1.0], [0.0, 1.0]]), np.array([[0.0, 1.0], [-1.0, 0.0]])
    s = 2.0
    i2t = s * 1 - np.log(np.exp(s * 1) + np.exp(0) + np.exp(-s))  # cos with the negatives' captions: 0, -1
    t2i = s * 1 - np.log(np.exp(s * 1) + 2 * np.exp(0))  # cos with the negatives' images: 0, 0
    np.testing.assert_allclose(clip_loss_scores(img, txt, neg_img, neg_txt, s), [(i2t + t2i) / 2])
    # leaving one negative out equals not passing it
    both = infonce_log_probs(img, txt, neg_img, neg_txt, s, exclude=np.array([1]))
    np.testing.assert_allclose(both, infonce_log_probs(img, txt, neg_img[:1], neg_txt[:1], s))


def test_clip_loss_removes_the_difficulty_that_csa_keeps():
    """Members' pairs are closer than their neighbours; non-members include 'easy' images close to every
    caption (high CS, but no closer to their own caption than to others)."""
    rng = np.random.default_rng(8)
    d, n = 16, 200
    txt = rng.normal(size=(n, d))
    hub = rng.normal(size=d)
    is_member = np.arange(n) < n // 2
    img = np.where(is_member[:, None], txt + 1.5 * rng.normal(size=(n, d)), 3 * hub + rng.normal(size=(n, d)))
    img[n // 2 :] += 0.6 * txt[n // 2 :]
    neg_txt = rng.normal(size=(300, d))
    neg_txt[:150] += 2 * hub  # half the negatives' captions are near the hub as well
    neg_img = rng.normal(size=(300, d))
    from m4i_assets.metrics.evaluation import roc_auc

    csa_auc = roc_auc(is_member, csa_scores(img, txt))
    loss_auc = roc_auc(is_member, clip_loss_scores(img, txt, neg_img, neg_txt, 10.0))
    assert loss_auc > csa_auc + 0.1


def test_self_excluded_log_probs_leave_the_record_out():
    rng = np.random.default_rng(9)
    img, txt = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    full = self_excluded_log_probs(img, txt, 5.0)
    for i in range(5):
        others = np.arange(5) != i
        np.testing.assert_allclose(full[i], infonce_log_probs(img[i : i + 1], txt[i : i + 1], img[others],
                                                              txt[others], 5.0)[0])  # fmt: skip


def test_rmia_is_the_share_of_population_dominated():
    # offline a = 1: Pr(x) is the OUT mean
    np.testing.assert_allclose(offline_marginal(np.array([[0.2, 0.4]]), a=1.0), [0.3])
    np.testing.assert_allclose(offline_marginal(np.array([[0.2, 0.4]]), a=0.3), [(1.3 * 0.3 + 0.7) / 2])
    p_z, ref_z = np.array([0.1, 0.2, 0.3, 0.4]), np.full((4, 1), 0.2)  # LR(z) under a = 1: 0.5, 1, 1.5, 2
    scores = rmia_scores(np.array([0.3, 0.05]), np.full((2, 1), 0.2), p_z, ref_z, a=1.0)
    np.testing.assert_allclose(scores, [2 / 4, 0])  # LR(x) = 1.5 beats z with LR 0.5 and 1 (strictly)


def test_rmia_calibrates_per_record_difficulty():
    rng = np.random.default_rng(10)
    n, m, r = 400, 300, 2
    is_member = np.arange(n) < n // 2
    easy_x, easy_z = rng.uniform(0.05, 0.9, n), rng.uniform(0.05, 0.9, m)  # how likely any model finds it
    ref_x = np.clip(easy_x[:, None] * rng.uniform(0.9, 1.1, (n, r)), 1e-3, 1)
    ref_z = np.clip(easy_z[:, None] * rng.uniform(0.9, 1.1, (m, r)), 1e-3, 1)
    p_x = np.clip(easy_x * (1 + 0.3 * is_member) * rng.uniform(0.9, 1.1, n), 1e-3, 1)
    p_z = np.clip(easy_z * rng.uniform(0.9, 1.1, m), 1e-3, 1)
    from m4i_assets.metrics.evaluation import roc_auc

    assert roc_auc(is_member, p_x) < 0.7 < 0.9 < roc_auc(is_member, rmia_scores(p_x, ref_x, p_z, ref_z, a=1.0))
    with pytest.raises(ValueError, match="a must lie"):
        offline_marginal(ref_x, a=2)


# --- captioner likelihood --------------------------------------------------------------------------
from m4i_assets.attacks.caption_loss import loss_ref_scores, loss_scores  # noqa: E402


def test_caption_loss_scores_low_loss_as_member_and_calibrates_difficulty():
    rng = np.random.default_rng(11)
    n = 300
    is_member = np.arange(n) < n // 2
    hardness = rng.uniform(1, 4, n)  # long or rare captions have high loss under any captioner
    refs = hardness[:, None] + 0.05 * rng.normal(size=(n, 3))
    target = hardness - 0.3 * is_member + 0.05 * rng.normal(size=n)
    from m4i_assets.metrics.evaluation import roc_auc

    assert loss_scores(np.array([1.0, 2.0])).tolist() == [-1.0, -2.0]
    assert roc_auc(is_member, loss_scores(target)) < 0.75
    assert roc_auc(is_member, loss_ref_scores(target, refs)) > 0.95
