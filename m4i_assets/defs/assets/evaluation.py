"""Evaluation assets: every attack of a model version scored against ground truth, logged to MLflow."""

import base64
import json

import numpy as np
import polars as pl
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, MetadataValue, asset

from m4i_assets.defs.assets.attacks import attack_assets
from m4i_assets.defs.partitions import model_versions
from m4i_assets.defs.resources import Storage, Tracking
from m4i_assets.metrics.evaluation import evaluate_scores, roc_plot_png
from m4i_assets.settings import AuditSettings
from m4i_assets.storage.warehouse import replace_rows


def metrics_markdown(rows: list[dict]) -> str:
    lines = [
        "| attack | n mem / non | AUC [95% CI] | bal. acc | TPR@1%FPR [CI] | TPR@0.1%FPR [CI] |",
        "|---|---|---|---|---|---|",
    ]

    def ci(r: dict, key: str) -> str:
        return f"{r[key]:.3f} [{r[key + '_ci_low']:.3f}, {r[key + '_ci_high']:.3f}]"

    for r in rows:
        lines.append(
            f"| {r['attack']} | {r['n_members']} / {r['n_nonmembers']} | {ci(r, 'auc')} "
            f"| {r['balanced_accuracy']:.3f} | {ci(r, 'tpr_at_1pct_fpr')} | {ci(r, 'tpr_at_0_1pct_fpr')} |"
        )
    return "\n".join(lines)


def sklearn_disagreement(curves: dict[str, tuple[np.ndarray, np.ndarray]], rows: list[dict]) -> float:
    """Largest gap between our AUC / TPR@1%FPR and scikit-learn's on the same scores."""
    from sklearn.metrics import roc_auc_score, roc_curve

    gap = 0.0
    for row in rows:
        labels, scores = curves[row["attack"]]
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        gap = max(
            gap, abs(roc_auc_score(labels, scores) - row["auc"]), abs(tpr[fpr <= 0.01].max() - row["tpr_at_1pct_fpr"])
        )
    return float(gap)


@asset(
    group_name="evaluation",
    partitions_def=model_versions,
    deps=attack_assets,
    kinds={"duckdb", "mlflow"},
    check_specs=[
        AssetCheckSpec(
            "agrees_with_sklearn",
            asset="attack_metrics",
            description="AUC and TPR@1%FPR recomputed by scikit-learn match",
        )
    ],
)
def attack_metrics(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage, tracking: Tracking
) -> MaterializeResult:
    """AUC, balanced accuracy and TPR at 1% / 0.1% FPR with bootstrap CIs for every attack of a
    model version, a log-log ROC plot, and one MLflow run (Carlini et al. 2022)."""
    version = context.partition_key
    info = storage.model_info(version)
    scores = storage.read(
        "SELECT attack, score, is_member FROM membership_scores WHERE model_version = ? AND is_member IS NOT NULL "
        "ORDER BY attack, record_id",
        [version],
    )
    rows, curves = [], {}
    for (attack,), group in scores.group_by(["attack"], maintain_order=True):
        labels, values = group["is_member"].to_numpy(), group["score"].to_numpy()
        ev = evaluate_scores(labels, values, n_bootstrap=settings.n_bootstrap, seed=settings.seed)
        rows.append({"attack": attack, **ev.as_row()})
        curves[attack] = (labels, values)
    if not rows:
        raise ValueError(f"no scored candidates with ground truth for {version}")
    png = roc_plot_png(curves, title=f"{info['role']} {version}")
    metric_frame = pl.DataFrame(rows)
    run_id = tracking.log_run(
        run_name=f"{info['audit']}/{version}",
        params={
            "audit": info["audit"],
            "model_version": version,
            "model_role": info["role"],
            "arch": info["arch"],
            "model_sha256": info["sha256"],
            "seed": settings.seed,
            "n_bootstrap": settings.n_bootstrap,
            "settings": settings.model_dump(),
            "train_config": info["train_config"],
        },
        metrics={f"{r['attack']}.{k}": v for r in rows for k, v in r.items() if k != "attack"},
        tags={
            "audit": info["audit"],
            "model_version": version,
            "model_role": info["role"],
            "dagster_run_id": context.run_id,
        },
        artifacts={"roc_loglog.png": png, "attack_metrics.json": json.dumps(rows, indent=2).encode()},
    )
    table = metric_frame.with_columns(
        model_version=pl.lit(version),
        audit=pl.lit(info["audit"]),
        mlflow_run_id=pl.lit(run_id),
        n_bootstrap=pl.lit(settings.n_bootstrap),
    )
    with storage.connect() as conn:
        replace_rows(conn, "attack_metrics", table, model_version=version)
        storage.refresh_views(conn)
    gap = sklearn_disagreement(curves, rows)
    return MaterializeResult(
        check_results=[
            AssetCheckResult(check_name="agrees_with_sklearn", passed=gap < 1e-9, metadata={"max_gap": gap})
        ],
        metadata={
            "dagster/row_count": table.height,
            "mlflow_run_id": run_id,
            "metrics": MetadataValue.md(metrics_markdown(rows)),
            "roc_loglog": MetadataValue.md(f"![ROC, log-log](data:image/png;base64,{base64.b64encode(png).decode()})"),
            **{f"{r['attack']}_auc": float(r["auc"]) for r in rows},
        },
    )
