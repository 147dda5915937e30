"""Assets of audits of the registry (`m4i_assets.data.audits`): the audit's plan (which attacks run, and
why the others are skipped) and, for an unlabelled audit, the estimated membership rate per version."""

import json

import polars as pl
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from m4i_assets.defs.assets.data import record_roles
from m4i_assets.defs.assets.signals import load_signal
from m4i_assets.defs.partitions import Step, VersionAsset
from m4i_assets.defs.resources import Storage, Tracking
from m4i_assets.metrics.membership_rate import estimate_membership_rate
from m4i_assets.settings import AuditSettings


def plan_markdown(plan: list[dict]) -> str:
    lines = ["| attack | status | reason |", "|---|---|---|"]
    return "\n".join(lines + [f"| {r['attack']} | {r['status']} | {r['reason']} |" for r in plan])


def replace_plan_rows(storage: Storage, audit: str, frame: pl.DataFrame, versions: list[str]) -> None:
    """Replace an audit's `audit_plan` rows of `versions` ('' for the audit-wide rows) with `frame` (columns
    attack, status, reason, kind, and model_version unless only '' is replaced), keeping the rows of every other
    version: the per-version skips the defended versions' releases add survive the plan's re-materialization."""
    if "model_version" not in frame.columns:
        frame = frame.with_columns(model_version=pl.lit(""))
    kept = storage.repository.plan_rows_except(audit, versions)
    columns = ["attack", "status", "reason", "model_version", "kind"]
    merged = pl.concat([kept.select(columns), frame.select(columns)], how="vertical_relaxed")
    storage.write("audit_plan", merged, audit=audit)


@asset(group_name="data", deps=[record_roles], kinds={"duckdb", "mlflow"})
def audit_plan(context: AssetExecutionContext, settings: AuditSettings, storage: Storage, tracking: Tracking):
    """Every attack of the audit's family: run, or skipped with what the audit lacks (references, labels,
    population, ...). Attacks are skipped, never faked (README, Rules of evidence)."""
    audit = settings.registered_audit(storage.root)
    if audit is None:
        raise ValueError(f"audit {settings.audit!r} is not in {settings.audit_registry_path(storage.root)}: a "
                         "controlled audit runs every attack")  # fmt: skip
    plan = audit.plan()
    replace_plan_rows(storage, audit.name, pl.DataFrame(plan).with_columns(kind=pl.lit(audit.kind)), [""])
    run_id = tracking.log_run(
        run_name=f"{audit.name}/audit_plan",
        params={
            "audit": audit.name,
            "kind": audit.kind,
            "family": audit.family,
            "dataset": audit.dataset,
            "roles_column": audit.column,
        },  # fmt: skip
        metrics={},
        tags={"audit": audit.name, "kind": "audit_plan", "dagster_run_id": context.run_id},
        artifacts={"audit_plan.json": json.dumps(plan, indent=2).encode()},
    )
    return MaterializeResult(metadata={"kind": audit.kind, "plan": MetadataValue.md(plan_markdown(plan)),
                                       "skipped": sum(r["status"] == "skipped" for r in plan),
                                       "mlflow_run_id": run_id})  # fmt: skip


def estimate_rate(step: Step) -> MaterializeResult:
    """An unlabelled audit's estimated membership rate (`metrics.membership_rate`) for CSA, the attack whose
    score of a known non-member is unbiased (no attack model was fitted on them): the share of candidates
    whose image-text cosine similarity lies above the known non-members' (1 - alpha) quantile, minus alpha."""
    version, settings, storage, tracking = step.version, step.settings, step.storage, step.tracking
    repo = storage.repository
    info = repo.model_info(version)
    emb = load_signal(storage, "embeddings", version)
    cands = repo.audit_records(info["audit"], ("candidate",)).select("record_id")
    known = repo.known_nonmembers(version).select("record_id")
    if not cands.height:  # a labelled or controlled audit (its job's full selection): attack_metrics instead
        return MaterializeResult(metadata={"skipped": f"audit {info['audit']!r} has no candidates of unknown "
                                                      "membership: its metrics are attack_metrics"})  # fmt: skip
    cs = {name: emb.join(ids, on="record_id", how="semi")["cosine_similarity"].to_numpy()
          for name, ids in (("candidates", cands), ("known", known))}  # fmt: skip
    rate = estimate_membership_rate(cs["candidates"], cs["known"], settings.membership_rate_alpha)
    row = {"attack": "csa", **rate.as_row()}
    run_id = tracking.log_run(
        run_name=f"{info['audit']}/{version}/membership_rate",
        params={"audit": info["audit"], "model_version": version, "alpha": settings.membership_rate_alpha},
        metrics={f"csa.{k}": float(v) for k, v in rate.as_row().items()},
        tags={
            "audit": info["audit"],
            "model_version": version,
            "kind": "membership_rate",
            "dagster_run_id": step.context.run_id,
        },  # fmt: skip
        artifacts={"membership_rate.json": json.dumps(row, indent=2).encode()},
    )
    frame = pl.DataFrame([row]).with_columns(model_version=pl.lit(version), audit=pl.lit(info["audit"]))
    storage.write("membership_rate", frame, model_version=version)
    return MaterializeResult(metadata={**{k: float(v) for k, v in rate.as_row().items()}, "mlflow_run_id": run_id})


VERSION_ASSETS = [
    VersionAsset("membership_rate", estimate_rate, ("embeddings",), "evaluation", frozenset({"duckdb", "mlflow"})),
]
