import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve

from m4i_assets.metrics.evaluation import (
    FPR_BOUNDS,
    evaluate_scores,
    roc_auc,
    roc_plot_png,
)


def _cases():
    rng = np.random.default_rng(0)
    for n in (10, 57, 400):
        labels = rng.random(n) < 0.5
        labels[:2] = [True, False]
        yield labels, rng.normal(size=n) + labels  # continuous scores
        yield labels, rng.integers(0, 4, size=n).astype(float)  # heavy ties
        yield labels, np.round(rng.normal(size=n) + labels, 1)  # some ties


@pytest.mark.parametrize("labels,scores", list(_cases()))
def test_auc_matches_sklearn(labels, scores):
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_tpr_at_fpr_matches_sklearn_roc(ties):
    """The reported TPR at each FPR bound (enough non-members for both bounds to be reported)."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(2000, bool), np.zeros(10_000, bool)]
    scores = rng.normal(size=len(labels)) + 1.5 * labels
    scores = np.round(scores, 1) if ties else scores
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    point = evaluate_scores(labels, scores, n_bootstrap=2).point
    for name, bound in FPR_BOUNDS.items():
        assert point[name] == pytest.approx(tpr[fpr <= bound].max(), abs=1e-12)


@pytest.mark.parametrize("labels,scores", list(_cases()))
def test_balanced_accuracy_is_best_threshold_sklearn(labels, scores):
    best = max(balanced_accuracy_score(labels, scores >= t) for t in np.r_[np.unique(scores), np.inf])
    assert evaluate_scores(labels, scores, n_bootstrap=2).point["balanced_accuracy"] == pytest.approx(best, abs=1e-12)


def test_perfect_and_inverted_scores():
    labels = np.array([1, 1, 0, 0], dtype=bool)
    assert roc_auc(labels, np.array([4.0, 3, 2, 1])) == 1.0
    assert evaluate_scores(labels, np.array([4.0, 3, 2, 1]), n_bootstrap=2).point["balanced_accuracy"] == 1.0
    assert roc_auc(labels, np.array([1.0, 2, 3, 4])) == 0.0
    assert roc_auc(labels, np.zeros(4)) == 0.5


def test_bootstrap_ci_is_seeded_and_brackets_the_point():
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(200, bool), np.zeros(1000, bool)]  # 1000 non-members: TPR@1%FPR is reported
    scores = rng.normal(size=1200) + 0.8 * labels
    a = evaluate_scores(labels, scores, n_bootstrap=200, seed=5)
    b = evaluate_scores(labels, scores, n_bootstrap=200, seed=5)
    assert a == b
    for key in ("auc", "balanced_accuracy", "tpr_at_1pct_fpr"):
        assert a.ci_low[key] <= a.point[key] <= a.ci_high[key]
    assert 0.65 < a.point["auc"] < 0.8 and a.ci_high["auc"] - a.ci_low["auc"] < 0.15


def test_chance_scores_have_a_ci_containing_one_half():
    rng = np.random.default_rng(11)
    labels = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    ev = evaluate_scores(labels, rng.normal(size=600), n_bootstrap=300)
    assert ev.ci_low["auc"] < 0.5 < ev.ci_high["auc"]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="non-finite|NaN"):
        evaluate_scores(np.array([True, False]), np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="members and non-members"):
        evaluate_scores(np.array([True, True]), np.array([0.0, 1.0]))


def test_roc_plot_is_a_png():
    labels = np.array([1, 0, 1, 0], dtype=bool)
    png = roc_plot_png({"csa": (labels, np.array([0.9, 0.1, 0.8, 0.3]))}, "t")
    assert png.startswith(b"\x89PNG")


def test_row_problems_flags_out_of_range_metrics_and_unequal_candidates():
    from m4i_assets.metrics.evaluation import row_problems

    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    good = {"attack": "csa", **evaluate_scores(labels, rng.normal(size=100) + labels, n_bootstrap=20).as_row()}
    assert row_problems([good, {**good, "attack": "aea"}]) == []
    assert "auc" in row_problems([{**good, "auc": 1.2}])[0]
    assert "different candidate sets" in row_problems([good, {**good, "attack": "x", "n_members": 49}])[0]


def test_low_fpr_figures_need_ten_possible_false_positives():
    from m4i_assets.metrics.evaluation import low_fpr_reason

    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(100, bool), np.zeros(500, bool)]
    ev = evaluate_scores(labels, rng.normal(size=600) + labels, n_bootstrap=20)
    assert ev.point["tpr_at_1pct_fpr"] is None and ev.point["tpr_at_0_1pct_fpr"] is None
    row = ev.as_row()
    assert "needs 1000 non-members" in row["tpr_at_1pct_fpr_null_reason"]
    assert "needs 10000 non-members" in row["tpr_at_0_1pct_fpr_null_reason"]
    assert row["tpr_at_1pct_fpr_raw"] is not None and 0 <= row["tpr_at_1pct_fpr_raw"] <= 1
    assert low_fpr_reason(1000, 0.01) is None and low_fpr_reason(999, 0.01) is not None


def test_paired_bootstrap_tells_apart_attacks_whose_cis_overlap():
    """Two attacks share most of their noise (the records' difficulty): their marginal CIs overlap, but the
    paired CI of the difference lies above 0."""
    from m4i_assets.metrics.evaluation import evaluate_attacks

    rng = np.random.default_rng(2)
    labels = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    shared = rng.normal(size=600)
    weak = shared + 0.5 * labels
    strong = shared + 0.6 * labels + 0.05 * rng.normal(size=600)
    ev = evaluate_attacks(labels, {"csa": weak, "better": strong}, n_bootstrap=300, seed=0, baselines=("csa",))
    a, b = ev.attacks["csa"], ev.attacks["better"]
    assert b.ci_low["auc"] < a.ci_high["auc"]  # the CIs overlap
    (c,) = [c for c in ev.comparisons if c["metric"] == "auc"]
    assert c["attack"] == "better" and c["baseline"] == "csa" and c["ci_low"] > 0
    assert c["difference"] == pytest.approx(b.point["auc"] - a.point["auc"])
    assert {c["metric"] for c in ev.comparisons} == {"auc"}  # 300 non-members: no reportable TPR at 1% FPR
    again = evaluate_attacks(labels, {"csa": weak, "better": strong}, n_bootstrap=300, seed=0, baselines=("csa",))
    assert again.comparisons == ev.comparisons


def test_clopper_pearson_and_the_known_nonmember_threshold():
    from m4i_assets.metrics.evaluation import clopper_pearson, known_threshold  # (metrics.privacy's)

    low, high = clopper_pearson(0, 100)
    assert low == 0 and high == pytest.approx(1 - 0.025 ** (1 / 100))  # the exact bound at k = 0
    low, high = clopper_pearson(50, 100)
    assert low < 0.5 < high and high - low < 0.21
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    scores = rng.normal(size=2000) + 2 * labels
    known = rng.normal(size=5000)  # same distribution as the non-member candidates
    row = known_threshold(labels, scores, known)
    assert row["known_threshold_fpr_1pct_ci_low"] <= 0.01 <= row["known_threshold_fpr_1pct_ci_high"]
    assert row["known_threshold_tpr_1pct"] > 0.2
    empty = known_threshold(labels, scores, None)
    assert empty["known_threshold_tpr_1pct"] is None and "no score" in empty["known_threshold_note"]


def test_permutation_test_of_a_real_and_a_null_signal():
    from m4i_assets.metrics.evaluation import permutation_test

    rng = np.random.default_rng(4)
    labels = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    real = permutation_test(labels, rng.normal(size=400) + labels, n_permutations=200, seed=0)
    null = permutation_test(labels, rng.normal(size=400), n_permutations=200, seed=0)
    assert real["p_value"] == pytest.approx(1 / 201) and null["p_value"] > 0.05
    assert null["null_auc_q025"] < 0.5 < null["null_auc_q975"]


def test_score_matrix_aligns_attacks_and_metric_rows_agree_with_sklearn():
    import polars as pl

    from m4i_assets.metrics.evaluation import metric_rows, score_matrix, sklearn_disagreement

    rng = np.random.default_rng(0)
    ids = [f"r{i:03d}" for i in range(200)]
    is_member = np.arange(200) < 60
    frames = [pl.DataFrame({"attack": a, "record_id": ids, "score": rng.normal(is_member * shift, 1),
                            "is_member": is_member}) for a, shift in (("csa", 1.0), ("aea", 0.5))]  # fmt: skip
    scored = pl.concat(frames).sample(fraction=1.0, shuffle=True, seed=1)  # any row order
    known = pl.DataFrame({"attack": "csa", "score": rng.normal(0, 1, 150)})
    labels, scores, known_scores = score_matrix(scored, known, "v")
    assert labels.sum() == 60 and set(scores) == {"csa", "aea"} and set(known_scores) == {"csa"}
    np.testing.assert_array_equal(scores["csa"], frames[0]["score"].to_numpy())  # back in record order
    rows, comparisons = metric_rows(labels, scores, known_scores, n_bootstrap=50, seed=0, baselines=("csa",))
    assert {r["attack"] for r in rows} == {"csa", "aea"}
    assert [(c["attack"], c["baseline"]) for c in comparisons][0] == ("aea", "csa")
    assert sklearn_disagreement({a: (labels, s) for a, s in scores.items()}, rows) < 1e-9
    with pytest.raises(ValueError, match="did not score every candidate"):
        score_matrix(scored.filter(~((pl.col("attack") == "aea") & (pl.col("record_id") == "r000"))), known, "v")
    with pytest.raises(ValueError, match="no scored candidates"):
        score_matrix(scored.head(0), known, "v")
