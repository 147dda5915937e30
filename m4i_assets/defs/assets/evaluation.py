"""Evaluation assets: every attack of a model version scored against ground truth, logged to MLflow,
then the comparison report, which the blind-baseline shift gate can block."""

import base64
import json

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from m4i_assets.defs.assets.attacks import score_assets, wsa_attack_model
from m4i_assets.defs.partitions import model_versions
from m4i_assets.defs.resources import Storage, Tracking
from m4i_assets.metrics import report
from m4i_assets.metrics.evaluation import evaluate_scores, roc_plot_png, row_problems
from m4i_assets.settings import AuditSettings


def sklearn_disagreement(curves: dict[str, tuple[np.ndarray, np.ndarray]], rows: list[dict]) -> float:
    """Largest gap between our AUC / TPR@1%FPR and scikit-learn's on the same scores."""
    from sklearn.metrics import roc_auc_score, roc_curve

    gap = 0.0
    for row in rows:
        labels, scores = curves[row["attack"]]
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        gap = max(
            gap,
            abs(roc_auc_score(labels, scores) - row["auc"]),
            abs(tpr[fpr <= 0.01].max() - row["tpr_at_1pct_fpr"]),
        )
    return float(gap)


def shift_gate(rows: list[dict], max_auc: float) -> AssetCheckResult:
    """The blind-baseline shift gate (Das et al. 2024) as a blocking check result."""
    passed, message = report.shift_verdict(rows, max_auc)
    blind = {k: v for r in rows if r["attack"] == report.BLIND for k, v in r.items() if k.startswith("auc")}
    return AssetCheckResult(
        check_name="shift_gate",
        passed=passed,
        severity=AssetCheckSeverity.ERROR,
        description=message,
        metadata={**blind, "max_auc": max_auc},
    )


@asset(
    group_name="evaluation",
    partitions_def=model_versions,
    deps=[*score_assets, wsa_attack_model, "m4i_mb_scores", "m4i_fb_scores"],  # (captioning: by key, no cycle)
    kinds={"duckdb", "mlflow"},
    check_specs=[
        AssetCheckSpec("agrees_with_sklearn", asset="attack_metrics",
                       description="AUC and TPR@1%FPR recomputed by scikit-learn match"),
        AssetCheckSpec("shift_gate", asset="attack_metrics", blocking=True,
                       description="blocks reporting when the blind baseline's AUC CI lies above the gate"),
        AssetCheckSpec("metrics_in_range", asset="attack_metrics", blocking=True,
                       description="metrics and CIs in [0, 1], every attack on the same candidates"),
    ],
)  # fmt: skip
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
    artifacts = {"roc_loglog.png": png, "attack_metrics.json": json.dumps(rows, indent=2).encode()}
    wsa_model = storage.attack_model_path(version, "wsa.safetensors")
    if wsa_model.exists():
        artifacts["wsa_attack_model.safetensors"] = wsa_model.read_bytes()
    run_id = tracking.log_run(
        run_name=f"{info['audit']}/{version}",
        params={
            "audit": info["audit"], "model_version": version, "model_role": info["role"], "arch": info["arch"],
            "model_sha256": info["sha256"], "seed": settings.seed, "n_bootstrap": settings.n_bootstrap,
            "settings": settings.model_dump(), "train_config": info["train_config"],
        },
        metrics={f"{r['attack']}.{k}": v for r in rows for k, v in r.items() if k != "attack"},
        tags={"audit": info["audit"], "model_version": version, "model_role": info["role"],
              "dagster_run_id": context.run_id},
        artifacts=artifacts,
    )  # fmt: skip
    table = pl.DataFrame(rows).with_columns(
        model_version=pl.lit(version),
        audit=pl.lit(info["audit"]),
        mlflow_run_id=pl.lit(run_id),
        n_bootstrap=pl.lit(settings.n_bootstrap),
    )
    storage.write("attack_metrics", table, model_version=version)
    gap = sklearn_disagreement(curves, rows)
    return MaterializeResult(
        check_results=[
            AssetCheckResult(check_name="agrees_with_sklearn", passed=gap < 1e-9, metadata={"max_gap": gap}),
            shift_gate(rows, settings.shift_gate_max_auc),
            AssetCheckResult(
                check_name="metrics_in_range",
                passed=not (problems := row_problems(rows)),
                metadata={"problems": MetadataValue.json(problems)},
            ),
        ],
        metadata={
            "dagster/row_count": table.height,
            "mlflow_run_id": run_id,
            "metrics": MetadataValue.md(report.metrics_markdown(rows)),
            "roc_loglog": MetadataValue.md(f"![ROC, log-log](data:image/png;base64,{base64.b64encode(png).decode()})"),
            **{f"{r['attack']}_auc": float(r["auc"]) for r in rows},
        },
    )


@asset(group_name="evaluation", partitions_def=model_versions, deps=[attack_metrics, "m4i_scenarios"], kinds={"mlflow"})
def audit_report(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage, tracking: Tracking
) -> MaterializeResult:
    """The comparison report of one model version: every attack with CIs, how each compares with CSA
    at low FPR, the null-control and shift verdicts, and for a captioner the M^4I scenario table. Runs
    only when the shift gate passed."""
    version = context.partition_key
    info = storage.model_info(version)
    rows = storage.read("SELECT * FROM attack_metrics WHERE model_version = ? ORDER BY attack", [version]).to_dicts()
    title = f"Membership audit of {version} ({info['role']}, {info['arch']}, audit {info['audit']})"
    text = report.audit_report(title, rows, settings.shift_gate_max_auc)
    scenarios = storage.read("SELECT * FROM m4i_scenarios WHERE model_version = ? ORDER BY attack", [version])
    if scenarios.height:  # a captioner: the M^4I threat scenarios too
        text += "\n\n## M^4I threat scenarios (Hu et al. 2022)\n\n" + report.scenarios_markdown(scenarios.to_dicts())
    tracking.log_artifacts(rows[0]["mlflow_run_id"], {"audit_report.md": text.encode()})
    return MaterializeResult(metadata={"report": MetadataValue.md(text), "mlflow_run_id": rows[0]["mlflow_run_id"]})
