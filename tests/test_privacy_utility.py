"""Privacy-utility rows, curve points and the best-defense pick, on hand-made attack and utility tables."""

import json

import numpy as np
import polars as pl
import pytest

from m4i_assets.metrics.evaluation import roc_auc
from m4i_assets.metrics.privacy_utility import (
    best_at_utility,
    best_defense,
    curve_points,
    defense_curves,
    defense_markdown,
    defense_rows,
    interpolate_tpr,
    matched_utility,
    privacy_utility_png,
    tpr_at_utility,
    worst_attack_heldout,
)


def _tables():
    models = pl.DataFrame({
        "model_version": ["t", "dp1", "dp2", "noise"],
        "role": ["target", "defended", "defended", "defended"],
        "defense": [None, "dp_sgd", "dp_sgd", "embedding_noise"],
        "defense_strength": [None, 0.5, 2.0, 0.1],
        "defense_facts": [None, json.dumps({"dp": {"epsilon": 30.0}}), json.dumps({"dp": {"epsilon": 2.0}}), None],
    })  # fmt: skip
    tpr = {"t": (0.5, 0.2), "dp1": (0.3, 0.1), "dp2": (0.05, 0.02), "noise": (0.2, 0.25)}  # (csa, aea)
    # 200 non-members: TPR@1%FPR is NULL (the rules of evidence), the known-threshold TPR is what the curves read
    metrics = pl.DataFrame([
        {"model_version": v, "attack": a, "auc": 0.5 + t, "auc_ci_low": 0.4, "auc_ci_high": 0.9,
         "tpr_at_1pct_fpr": None, "tpr_at_1pct_fpr_ci_low": None, "tpr_at_1pct_fpr_ci_high": None,
         "tpr_at_1pct_fpr_null_reason": "200 non-members x 0.01 FPR = 2 false positives < 10",
         "known_threshold_tpr_1pct": t, "known_threshold_tpr_1pct_ci_low": t / 2,
         "known_threshold_tpr_1pct_ci_high": min(1, 2 * t), "known_threshold_fpr_1pct": 0.015,
         "known_threshold_fpr_1pct_ci_low": 0.003, "known_threshold_fpr_1pct_ci_high": 0.043, "mlflow_run_id": v}
        for v, pair in tpr.items() for a, t in zip(("csa", "aea", "blind_baseline"), (*pair, 0.9))
    ], schema_overrides={"tpr_at_1pct_fpr": pl.Float64, "tpr_at_1pct_fpr_ci_low": pl.Float64,
                         "tpr_at_1pct_fpr_ci_high": pl.Float64})  # fmt: skip
    utility = pl.DataFrame({"model_version": ["t", "dp1", "dp2", "noise"], "metric": "i2t_recall@5",
                            "value": [0.80, 0.76, 0.40, 0.78]})  # fmt: skip
    return models, metrics, utility


def test_rows_points_and_best_defense():
    rows = defense_rows(*_tables(), family="clip")
    assert rows.height == 8 and "blind_baseline" not in rows["attack"].to_list()  # blind baseline is no attack
    assert rows.filter(pl.col("model_version") == "dp2")["epsilon"].to_list() == [2.0, 2.0]
    points = curve_points(rows)
    assert rows["tpr_at_1pct_fpr"].null_count() == rows.height  # never the raw figure below 1000 non-members
    worst = dict(zip(points["model_version"], points["tpr"]))
    assert worst == {"t": 0.5, "dp1": 0.3, "dp2": 0.05, "noise": 0.25}  # strongest attack per version
    assert dict(zip(points["model_version"], points["worst_attack"]))["noise"] == "aea"
    # dp2 has the lowest TPR but loses half the utility; within 10%: dp1 (0.95) and noise (0.975).
    assert best_defense(rows)["model_version"] == "noise"
    assert best_defense(rows, max_relative_loss=0.6)["model_version"] == "dp2"
    assert best_defense(rows, max_relative_loss=0.0) is None
    assert (
        "| dp_sgd | 2 | 2 |  | csa | naive | 0.050 [0.025, 0.100] | known 1% threshold | 0.015 |"
        in defense_markdown(rows)
    )
    # from 1000 non-members on, the reported TPR@1%FPR (bootstrap CI) is the read
    _, metrics, _ = _tables()
    metrics = metrics.with_columns(tpr_at_1pct_fpr=pl.col("known_threshold_tpr_1pct") + 0.01,
                                   tpr_at_1pct_fpr_ci_low=pl.lit(0.0), tpr_at_1pct_fpr_ci_high=pl.lit(1.0))  # fmt: skip
    reported = curve_points(defense_rows(_tables()[0], metrics, _tables()[2], family="clip"))
    assert set(reported["figure"]) == {"tpr_at_1pct_fpr"} and reported["fpr"].null_count() == reported.height
    assert dict(zip(reported["model_version"], reported["tpr"]))["dp2"] == pytest.approx(0.06)
    assert privacy_utility_png(rows, "clip").startswith(b"\x89PNG")


def test_the_adaptive_attacker_is_the_privacy_read_and_clip_epsilons_are_marked():
    models, metrics, utility = _tables()
    facts = json.dumps({"dp": {"epsilon": 30.0, "epsilon_is_guarantee": False}})
    models = models.with_columns(defense_facts=pl.when(pl.col("model_version") == "dp1").then(pl.lit(facts))
                                 .otherwise(pl.col("defense_facts")))  # fmt: skip
    twin = {"model_version": "noise+k8", "role": "defended", "defense": "embedding_noise", "defense_strength": 0.1,
            "defense_facts": json.dumps({"attacker": "adaptive", "queries": 8})}  # fmt: skip
    models = pl.concat([models, pl.DataFrame([twin])])
    doubled = metrics.filter(pl.col("model_version") == "noise").with_columns(
        model_version=pl.lit("noise+k8"), known_threshold_tpr_1pct=pl.col("known_threshold_tpr_1pct") * 2)  # fmt: skip
    metrics = pl.concat([metrics, doubled])
    utility = pl.concat([utility, pl.DataFrame({"model_version": ["noise+k8"], "metric": "i2t_recall@5",
                                                "value": [0.78]})])  # fmt: skip
    rows = defense_rows(models, metrics, utility, family="clip")
    assert set(rows.filter(pl.col("defense") == "embedding_noise")["attacker"]) == {"naive", "adaptive"}
    points = curve_points(rows).filter(pl.col("defense") == "embedding_noise")
    assert points.height == 1 and points["attacker"][0] == "adaptive" and points["tpr"][0] == 0.5
    table = defense_markdown(rows)
    assert "| dp_sgd | 0.5 | 30 (not a guarantee) |" in table and "| dp_sgd | 2 | 2 |" in table


def _points():
    return pl.DataFrame({
        "defense": ["none", "dp_sgd", "dp_sgd", "dp_sgd", "noise", "noise"],
        "strength": [None, 0.5, 1.0, 2.0, 0.05, 0.1],
        "utility": [0.80, 0.70, 0.50, 0.30, 0.75, 0.60],
        "tpr": [0.50, 0.10, 0.05, 0.02, 0.30, 0.20],
    })  # fmt: skip


def test_interpolation_stays_inside_a_curve():
    dp = _points().filter(pl.col("defense") == "dp_sgd")
    assert interpolate_tpr(dp, 0.60) == pytest.approx(0.075)
    assert interpolate_tpr(dp, 0.30) == pytest.approx(0.02)
    assert interpolate_tpr(dp, 0.75) is None and interpolate_tpr(dp, 0.2) is None


def test_frontier_at_matched_utility_compares_each_point_with_the_other_curves():
    frontier = {(r["defense"], r["strength"]): r for r in matched_utility(_points()).iter_rows(named=True)}
    # noise at 0.1 keeps 0.60 utility with TPR 0.20; DP-SGD at the same utility has 0.075: not on the frontier
    assert frontier[("noise", 0.1)]["frontier_defense"] == "dp_sgd"
    assert frontier[("noise", 0.1)]["frontier_tpr"] == pytest.approx(0.075)
    assert not frontier[("noise", 0.1)]["on_frontier"]
    # dp_sgd at 0.5 (utility 0.70) is inside noise's range [0.60, 0.75] and below it
    assert frontier[("dp_sgd", 0.5)]["frontier_tpr"] == pytest.approx(0.2 + (0.70 - 0.60) / 0.15 * 0.1)
    assert frontier[("dp_sgd", 0.5)]["on_frontier"]
    # at utility 0.30 noise's curve has no segment, but its strengths keep more utility: 0.20 at 0.60 is what noise
    # leaks while keeping at least 0.30, and DP-SGD's 0.02 is below it
    assert frontier[("dp_sgd", 2.0)]["frontier_defense"] == "noise"
    assert frontier[("dp_sgd", 2.0)]["frontier_tpr"] == pytest.approx(0.20) and frontier[("dp_sgd", 2.0)]["on_frontier"]
    assert best_at_utility(_points(), 0.65)["defense"] == "dp_sgd"
    assert best_at_utility(_points(), 0.85) is None  # above the target: no curve reaches it


def test_a_defense_at_one_strength_is_compared_on_its_segment_from_the_target():
    """Strength zero of every defense is the undefended target, so a single-strength defense still brackets the
    utilities between the target's and its own."""
    points = pl.concat([_points(), pl.DataFrame({"defense": ["rounding"], "strength": [2.0], "utility": [0.70],
                                                 "tpr": [0.40]})])  # fmt: skip
    curves = defense_curves(points)
    assert interpolate_tpr(curves["rounding"], 0.75) == pytest.approx(0.45)  # halfway to the target's (0.80, 0.50)
    assert interpolate_tpr(curves["rounding"], 0.65) is None  # no extrapolation below its one strength
    frontier = {(r["defense"], r["strength"]): r for r in matched_utility(points).iter_rows(named=True)}
    # noise at 0.05 keeps 0.75 utility: rounding's segment gives 0.45 there, DP-SGD's from (0.70, 0.10) to the
    # target (0.80, 0.50) gives 0.30, which is the frontier
    assert frontier[("noise", 0.05)]["frontier_defense"] == "dp_sgd"
    assert frontier[("noise", 0.05)]["frontier_tpr"] == pytest.approx(0.30)
    assert (
        frontier[("rounding", 2.0)]["frontier_defense"] == "dp_sgd" and not frontier[("rounding", 2.0)]["on_frontier"]
    )
    assert best_at_utility(points, 0.79)["tpr"] == pytest.approx(0.46)


def test_a_point_that_keeps_more_utility_and_leaks_less_is_best_below_its_utility():
    """A defense measured above the target's utility with less leakage (augmentation on an overfit target) has no
    segment at 90% of the target's utility, yet it beats every curve there: matched utility reads each defense at
    that utility or more, never only inside its own segments."""
    points = pl.concat([_points(), pl.DataFrame({"defense": ["augmentation"], "strength": [0.5], "utility": [0.90],
                                                 "tpr": [0.10]})])  # fmt: skip
    curves = defense_curves(points)
    assert interpolate_tpr(curves["augmentation"], 0.72) is None  # its segment runs from the target (0.80) to 0.90
    assert tpr_at_utility(curves["augmentation"], 0.72) == pytest.approx(0.10)
    assert tpr_at_utility(curves["dp_sgd"], 0.72) == pytest.approx(0.1 + 0.2 * 0.4)  # on its segment to the target
    assert tpr_at_utility(curves["augmentation"], 0.95) is None  # nothing keeps that much
    assert best_at_utility(points, 0.72) == {"defense": "augmentation", "utility": 0.72, "tpr": pytest.approx(0.10)}
    frontier = {(r["defense"], r["strength"]): r for r in matched_utility(points).iter_rows(named=True)}
    assert frontier[("noise", 0.05)]["frontier_defense"] == "augmentation"  # 0.10 at 0.90 beats DP-SGD's 0.30


def test_worst_attack_on_held_out_halves_is_not_biased_upward_by_the_pick():
    """Ten attacks that are all pure noise: the max of their AUCs on all records is biased above 0.5, the
    attack picked on one half and measured on the other is not."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    maxima, heldout = [], []
    for rep in range(20):
        scores = {f"a{i}": rng.standard_normal(400) for i in range(10)}
        maxima.append(max(roc_auc(labels, s) for s in scores.values()))
        heldout.append(worst_attack_heldout(labels, scores, roc_auc, seed=rep)["value"])
    assert np.mean(maxima) > 0.53
    assert abs(np.mean(heldout) - 0.5) < 0.015
    strong = {"weak": rng.standard_normal(400), "strong": rng.standard_normal(400) + 2 * labels}
    picked = worst_attack_heldout(labels, strong, roc_auc)
    assert picked["attack_first_half"] == picked["attack_second_half"] == "strong" and picked["value"] > 0.9


def test_a_point_without_a_privacy_figure_is_left_out_of_the_plot():
    """A version only shadow-trained classifiers attack (no known non-member scores, below 1000 non-members: e.g.
    a sampled-decoding captioner, whose loss attacks its captions-only release rules out) has no privacy read:
    the table shows it blank, the plot leaves it out."""
    models, metrics, utility = _tables()
    metrics = metrics.with_columns(
        known_threshold_tpr_1pct=pl.when(pl.col("model_version") == "noise").then(None)
        .otherwise(pl.col("known_threshold_tpr_1pct")))  # fmt: skip
    rows = defense_rows(models, metrics, utility, family="clip")
    assert dict(zip(curve_points(rows)["model_version"], curve_points(rows)["tpr"]))["noise"] is None
    assert privacy_utility_png(rows, "clip").startswith(b"\x89PNG")
