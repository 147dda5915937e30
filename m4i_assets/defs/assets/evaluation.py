"""Evaluation assets: every attack of a model version scored against ground truth, logged to MLflow,
then the comparison report, which the blind-baseline shift gate can block."""

import base64
import json

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    MaterializeResult,
    MetadataValue,
)

from m4i_assets.defs.assets.captioning import SCORE_ASSETS
from m4i_assets.defs.partitions import Step, VersionAsset
from m4i_assets.defs.resources import Storage
from m4i_assets.metrics import report
from m4i_assets.metrics.evaluation import (
    metric_rows,
    permutation_test,
    roc_plot_png,
    row_problems,
    score_matrix,
    sklearn_disagreement,
)
from m4i_assets.scoring import SCORERS
from m4i_assets.settings import AuditSettings


def version_verdicts(storage: Storage, settings: AuditSettings, version: str) -> dict:
    """What a version's verdicts rest on: its `attack_metrics` rows, `attack_comparisons` rows, the
    known-vs-candidate non-member shift check, and the label-permutation test of its best attack."""
    repo = storage.repository
    rows = repo.of_version("attack_metrics", version, "attack").to_dicts()
    comparisons = repo.of_version("attack_comparisons", version).to_dicts()
    permutation = None
    best = report.best_attack(rows)
    if best is not None:
        scored = repo.scores_with_truth(version, best["attack"])
        permutation = {
            "attack": best["attack"],
            **permutation_test(
                scored["is_member"].to_numpy(), scored["score"].to_numpy(), settings.n_permutations, settings.seed
            ),
        }
    return {
        "rows": rows,
        "comparisons": comparisons,
        "known_vs_candidates": repo.shift_check(version),
        "permutation": permutation,
    }


def shift_gate(rows: list[dict], margin: float, known_vs_candidates: dict | None) -> AssetCheckResult:
    """The distribution-shift gate (Das et al. 2024) as a blocking check result."""
    passed, message = report.shift_verdict(rows, margin, known_vs_candidates)
    blind = {k: v for r in rows if r["attack"] == report.BLIND for k, v in r.items() if k.startswith("auc")}
    known = {f"known_vs_candidates_{k}": v for k, v in (known_vs_candidates or {}).items() if k.startswith("auc")}
    return AssetCheckResult(
        check_name="shift_gate",
        passed=passed,
        severity=AssetCheckSeverity.ERROR,
        description=message,
        metadata={**blind, **known, "margin": margin},
    )


def null_control_check(info: dict, rows: list[dict]) -> AssetCheckResult:
    """`report.null_control_verdict` as a warning check result."""
    passed, message, off = report.null_control_verdict(info["role"], rows)
    return AssetCheckResult(check_name="null_control_at_chance", passed=passed, severity=AssetCheckSeverity.WARN,
                            description=message, metadata={"off_chance": MetadataValue.json(off)})  # fmt: skip


def evaluate_version(step: Step) -> MaterializeResult:
    """AUC, balanced accuracy and TPR at 1% / 0.1% FPR (NULL below ten possible false positives) with paired
    bootstrap CIs for every attack of a model version, TPR and realised FPR at the known non-members'
    thresholds with Clopper-Pearson CIs, the paired differences from CSA and the blind baseline
    (`attack_comparisons`), a log-log ROC plot, and one MLflow run (Carlini et al. 2022; the rules of evidence)."""
    version, settings, storage, tracking = step.version, step.settings, step.storage, step.tracking
    repo = storage.repository
    info = repo.model_info(version)
    labels, scores, known = score_matrix(repo.scores_with_truth(version), repo.known_scores(version), version)
    rows, comparisons = metric_rows(labels, scores, known, settings.n_bootstrap, settings.seed, report.BASELINES)
    curves = {a: (labels, s) for a, s in scores.items()}
    png = roc_plot_png(curves, title=f"{info['role']} {version}")
    comparisons = [{"model_version": version, "audit": info["audit"], **c} for c in comparisons]
    artifacts = {"roc_loglog.png": png, "attack_metrics.json": json.dumps(rows, indent=2).encode(),
                 "attack_comparisons.json": json.dumps(comparisons, indent=2).encode()}  # fmt: skip
    wsa_model = storage.attack_model_path(version, "wsa.safetensors")
    if wsa_model.exists():
        artifacts["wsa_attack_model.safetensors"] = wsa_model.read_bytes()
    numbers = {f"{r['attack']}.{k}": v for r in rows for k, v in r.items()
               if k != "attack" and isinstance(v, (int, float)) and v is not None}  # fmt: skip
    numbers |= {f"{c['attack']}-{c['baseline']}.{c['metric']}.{k}": c[k] for c in comparisons
                for k in ("difference", "ci_low", "ci_high")}  # fmt: skip
    run_id = tracking.log_run(
        run_name=f"{info['audit']}/{version}",
        params={
            "audit": info["audit"], "model_version": version, "model_role": info["role"], "arch": info["arch"],
            "model_sha256": info["sha256"], "seed": settings.seed, "n_bootstrap": settings.n_bootstrap,
            "settings": settings.model_dump(), "train_config": info["train_config"],
        },
        metrics=numbers,
        tags={"audit": info["audit"], "model_version": version, "model_role": info["role"],
              "dagster_run_id": step.context.run_id},
        artifacts=artifacts,
    )  # fmt: skip
    table = pl.DataFrame(rows, infer_schema_length=None).with_columns(
        model_version=pl.lit(version),
        audit=pl.lit(info["audit"]),
        mlflow_run_id=pl.lit(run_id),
        n_bootstrap=pl.lit(settings.n_bootstrap),
    )
    comparison_table = pl.DataFrame(comparisons, schema={
        "model_version": pl.String, "audit": pl.String, "attack": pl.String, "baseline": pl.String,
        "metric": pl.String, "difference": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64})  # fmt: skip
    storage.write("attack_metrics", table, model_version=version)
    storage.write("attack_comparisons", comparison_table, model_version=version)
    gap = sklearn_disagreement(curves, rows)
    beats, beats_text = report.beats_blind_verdict(rows, comparisons)
    return MaterializeResult(
        check_results=[
            AssetCheckResult(check_name="agrees_with_sklearn", passed=gap < 1e-9, metadata={"max_gap": gap}),
            shift_gate(rows, settings.shift_gate_margin, repo.shift_check(version)),
            AssetCheckResult(
                check_name="beats_blind_baseline",
                passed=beats,
                severity=AssetCheckSeverity.WARN,
                description=beats_text,
            ),
            null_control_check(info, rows),
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
            "attack_comparisons": MetadataValue.md(report.comparisons_markdown(comparisons)),
            "roc_loglog": MetadataValue.md(f"![ROC, log-log](data:image/png;base64,{base64.b64encode(png).decode()})"),
            **{f"{r['attack']}_auc": float(r["auc"]) for r in rows},
        },
    )


def report_version(step: Step) -> MaterializeResult:
    """The comparison report of one model version: every attack with CIs, the paired comparisons with CSA
    and the blind baseline, the shift, null-control and permutation verdicts, and for a captioner the M^4I
    scenario table. Runs only when the shift gate passed."""
    version, settings, storage, tracking = step.version, step.settings, step.storage, step.tracking
    repo = storage.repository
    info = repo.model_info(version)
    v = version_verdicts(storage, settings, version)
    title = f"Membership audit of {version} ({info['role']}, {info['arch']}, audit {info['audit']})"
    text = report.audit_report(title, v["rows"], v["comparisons"], settings.shift_gate_margin,
                               v["known_vs_candidates"], v["permutation"])  # fmt: skip
    scenarios = repo.of_version("m4i_scenarios", version, "attack")
    if scenarios.height:  # a captioner: the M^4I threat scenarios too
        text += "\n\n## M^4I threat scenarios (Hu et al. 2022)\n\n" + report.scenarios_markdown(scenarios.to_dicts())
    run_id = v["rows"][0]["mlflow_run_id"]
    permutation = v["permutation"] or {}
    tracking.log_metrics(run_id, {f"permutation.{k}": x for k, x in permutation.items() if k != "attack"},
                         {"audit_report.md": text.encode()})  # fmt: skip
    return MaterializeResult(metadata={"report": MetadataValue.md(text), "mlflow_run_id": run_id,
                                       "permutation_test": MetadataValue.json(permutation)})  # fmt: skip


CHECKS = {
    "agrees_with_sklearn": ("AUC and TPR@1%FPR recomputed by scikit-learn match", False),
    "shift_gate": (
        "blocks reporting when the blind baseline's AUC CI (or known vs candidate non-members') lies above "
        "0.5 by more than the margin",
        True,
    ),
    "beats_blind_baseline": ("the paired CI of (best attack AUC - blind AUC) lies above 0 (Das et al. 2024)", False),
    "null_control_at_chance": ("on a null control, every attack's AUC CI contains 0.5", False),
    "metrics_in_range": ("metrics and CIs in [0, 1], every attack on the same candidates", True),
}
# every asset that writes a family's scores (or WSA's attack model), read by attack_metrics where the family has it
SCORED = (*(s.key for s in SCORERS), *SCORE_ASSETS, "wsa_attack_model")
VERSION_ASSETS = [
    VersionAsset("attack_metrics", evaluate_version, SCORED, "evaluation", frozenset({"duckdb", "mlflow"}), CHECKS),
    VersionAsset("audit_report", report_version, ("attack_metrics", "m4i_scenarios"), "evaluation",
                 frozenset({"mlflow"})),
]  # fmt: skip
