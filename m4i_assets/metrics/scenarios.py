"""The M^4I scenario table (Hu et al. 2022, section 4.3): every attack under each threat scenario, with the
spread over shadow seeds (training variance) and the paper's attack success rate."""

import polars as pl

from m4i_assets.metrics.evaluation import evaluate_scores
from m4i_assets.metrics.report import seed_spread

KEYS = ("attack", "scenario", "shadow_dataset", "shadow_arch")


def scenario_rows(scored: pl.DataFrame, n_bootstrap: int, seed: int) -> list[dict]:
    """One row per (attack, scenario, shadow dataset and arch) of `attacks.m4i.scenario_scores`: AUC and
    TPR@1%FPR with bootstrap CIs of the first shadow seed, the mean and standard deviation of both over every
    seed's shadow (training variance), and the attack success rate, the accuracy of the shadow-threshold
    predictions (the paper's headline figure; NULL for the likelihood attacks, which have no shadow threshold)."""
    from m4i_assets.attacks.m4i import SCENARIOS, WHITE_BOX

    rows = []
    for group in scored.sort("shadow_seed").partition_by(list(KEYS), maintain_order=True):
        per_seed = []
        for one in group.partition_by("shadow_seed", maintain_order=True):
            labels = one["is_member"].to_numpy()
            ev = evaluate_scores(labels, one["score"].to_numpy(), n_bootstrap=n_bootstrap, seed=seed).as_row()
            predicted = one["predicted_member"]
            rate = None if predicted.null_count() else float((predicted.to_numpy() == labels).mean())
            per_seed.append((one, ev, rate))
        first, ev, rate = per_seed[0]
        auc_mean, auc_std = seed_spread([e["auc"] for _, e, _ in per_seed])
        tpr_mean, tpr_std = seed_spread([e["tpr_at_1pct_fpr"] for _, e, _ in per_seed])
        rows.append({
            **{k: first[k][0] for k in (*KEYS, "shadow_version", "classifier", "shadow_accuracy")},
            **{k: ev[k] for k in ("n_members", "n_nonmembers", "auc", "auc_ci_low", "auc_ci_high", "tpr_at_1pct_fpr",
                                  "tpr_at_1pct_fpr_ci_low", "tpr_at_1pct_fpr_ci_high")},
            "attack_success_rate": rate, "n_seeds": len(per_seed),
            "auc_seed_mean": auc_mean, "auc_seed_std": auc_std,
            "tpr_at_1pct_fpr_seed_mean": tpr_mean, "tpr_at_1pct_fpr_seed_std": tpr_std,
        })  # fmt: skip
    order = (WHITE_BOX, *SCENARIOS)
    return sorted(rows, key=lambda r: (r["attack"], order.index(r["scenario"]), r["shadow_dataset"], r["shadow_arch"]))


def scenario_metrics(rows: list[dict]) -> dict[str, float]:
    """The scenario table's figures as MLflow metrics, `<attack>.<scenario>.<figure>` (NULL figures left out)."""
    figures = ("auc", "auc_ci_low", "auc_ci_high", "tpr_at_1pct_fpr", "attack_success_rate", "auc_seed_std")
    return {f"{r['attack']}.{r['scenario']}.{k}": r[k] for r in rows for k in figures if r[k] is not None}
