"""Privacy-utility rows, curve points and the best-defense pick, on hand-made attack and utility tables."""

import json

import polars as pl

from m4i_assets.metrics.privacy_utility import (
    best_defense,
    curve_points,
    defense_markdown,
    defense_rows,
    privacy_utility_png,
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
    metrics = pl.DataFrame([
        {"model_version": v, "attack": a, "auc": 0.5 + t, "auc_ci_low": 0.4, "auc_ci_high": 0.9,
         "tpr_at_1pct_fpr": t, "tpr_at_1pct_fpr_ci_low": 0.0, "tpr_at_1pct_fpr_ci_high": 1.0, "mlflow_run_id": v}
        for v, pair in tpr.items() for a, t in zip(("csa", "aea", "blind_baseline"), (*pair, 0.9))
    ])  # fmt: skip
    utility = pl.DataFrame({"model_version": ["t", "dp1", "dp2", "noise"], "metric": "i2t_recall@5",
                            "value": [0.80, 0.76, 0.40, 0.78]})  # fmt: skip
    return models, metrics, utility


def test_rows_points_and_best_defense():
    rows = defense_rows(*_tables(), family="clip")
    assert rows.height == 8 and "blind_baseline" not in rows["attack"].to_list()  # blind baseline is no attack
    assert rows.filter(pl.col("model_version") == "dp2")["epsilon"].to_list() == [2.0, 2.0]
    points = curve_points(rows)
    worst = dict(zip(points["model_version"], points["tpr_at_1pct_fpr"]))
    assert worst == {"t": 0.5, "dp1": 0.3, "dp2": 0.05, "noise": 0.25}  # strongest attack per version
    assert dict(zip(points["model_version"], points["worst_attack"]))["noise"] == "aea"
    # dp2 has the lowest TPR but loses half the utility; within 10%: dp1 (0.95) and noise (0.975).
    assert best_defense(rows)["model_version"] == "noise"
    assert best_defense(rows, max_relative_loss=0.6)["model_version"] == "dp2"
    assert best_defense(rows, max_relative_loss=0.0) is None
    assert "| dp_sgd | 2 | 2 | csa | 0.050 |" in defense_markdown(rows)
    assert privacy_utility_png(rows, "clip").startswith(b"\x89PNG")
