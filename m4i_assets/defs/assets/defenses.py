"""Defense assets (README, Defenses): defended versions of each family's target, every version's
utility on held-out records, and the privacy-utility evaluation that sets them beside the target.

A defended version is an ordinary model version (role `defended`, its defense and strength in `models`):
a training-time defense retrains the target's recipe with the defense switched on, a release-time defense
registers the target's checkpoint again with its outputs perturbed; either way the audit jobs run on it
unchanged.
"""

import base64
import json
from dataclasses import replace

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from m4i_assets import plans
from m4i_assets.defenses.grid import defended_spec, grid, is_release
from m4i_assets.defenses.release import RELEASE_DEFENSES, attack_skip_reason, family_attacks_needing, interface_of
from m4i_assets.defs.assets.audits import replace_plan_rows
from m4i_assets.defs.assets.models import train_and_register
from m4i_assets.defs.partitions import Step, VersionAsset, add_versions, version_key
from m4i_assets.defs.resources import Compute, Storage, Tracking
from m4i_assets.families import FAMILIES, Family
from m4i_assets.metrics import privacy_utility as pu
from m4i_assets.plans import TrainJob, validation_sample
from m4i_assets.scoring import UTILITIES
from m4i_assets.settings import AuditSettings


def metric_name(row: dict, metric: str = "tpr_at_1pct_fpr") -> str:
    """The MLflow metric name of one row's `metric` (Tracking makes it a name MLflow accepts)."""
    strength = "" if row["strength"] is None else f"{row['strength']:g}"
    return f"{row['family']}.{row['defense']}{strength}.{row['attacker']}.{row['attack']}.{metric}"


def latest_target(storage: Storage, audit: str, family: str) -> dict:
    versions = storage.repository.latest_versions(audit, "target", family=family)
    if not versions:
        raise ValueError(f"audit {audit!r} has no {family} target yet: materialize target_{family} first")
    return storage.repository.model_info(versions[0])


def adaptive_queries(defense: str, queries: int) -> int:
    """How many variant queries the adaptive attacker of a release-time defense averages: `queries` against a
    randomized release (`m4i_assets.attacks.adaptive`: noisy embeddings averaged, sampled captions' metrics and
    FB features averaged); 1 (no adaptive twin) where the release is deterministic."""
    return queries if RELEASE_DEFENSES[defense].randomized else 1


def plan_release_skips(storage: Storage, audit: str, family: str, versions: list[dict]) -> list[dict]:
    """`audit_plan` rows of the attacks each release rules out (`attack_skip_reason`: WSA needs embeddings, a
    similarity-rounding release gives similarities only; the loss attacks need likelihoods, a sampled-decoding
    release gives captions only), one per (version, attack); the audit's other rows are kept. Returns the rows."""
    rows = [{"attack": attack, "status": "skipped", "reason": reason, "model_version": r["model_version"]}
            for r in versions for attack in family_attacks_needing(family)
            if (reason := attack_skip_reason(attack, interface_of(family, r["defense"])))]  # fmt: skip
    kind = storage.repository.plan_kind(audit) or "labelled"  # a controlled audit is labelled
    frame = pl.DataFrame(rows, schema={"attack": pl.Utf8, "status": pl.Utf8, "reason": pl.Utf8,
                                       "model_version": pl.Utf8}).with_columns(kind=pl.lit(kind))  # fmt: skip
    replace_plan_rows(storage, audit, frame, [r["model_version"] for r in versions])
    return rows


def adaptive_helper_jobs(
    settings: AuditSettings,
    family: str,
    defenses: dict[str, list[float]],
    population: pl.DataFrame,
    validation: pl.DataFrame,
    target: str,
) -> list[TrainJob]:
    """Helpers for the adaptive attacker of a training-time defense (Tramer et al. 2020; Aerni et al., CCS 2024):
    the family's helpers of the undefended plan (`plans.adaptive_helper_jobs`: reference CLIPs, the
    unrestricted scenario's shadow captioners), each with its own records, known non-members and seed and the
    defended target's defense and strength switched on, for each (defense, strength) of `adaptive_references`
    in the grid (role `defended_reference` / `defended_shadow`, so no undefended audit ever learns from them):
    the two helper sets differ only by the defense."""
    wanted = {(d, float(s)) for d, strengths in settings.adaptive_references.items() for s in strengths}
    helpers = plans.adaptive_helper_jobs(FAMILIES[family], settings, population)
    jobs = []
    for defense, strength in grid(defenses, family):
        if is_release(defense) or (defense, strength) not in wanted:
            continue
        for helper in helpers:
            jobs.append(replace(helper, role=FAMILIES[family].defended_helper_role,
                                spec=defense_spec(settings, helper.spec, defense, strength),
                                defense=(defense, strength, target),
                                validation=validation if defense == "early_stopping" else None))  # fmt: skip
    return jobs


def defense_spec(settings: AuditSettings, spec, defense: str, strength: float):
    """A training recipe with one training-time defense on (DP-SGD with the settings' clipping norm and delta)."""
    spec = defended_spec(spec, defense, strength)
    if defense == "dp_sgd":
        spec = replace(spec, dp_max_grad_norm=settings.dp_max_grad_norm, dp_delta=settings.dp_delta)
    return spec


def register_adaptive_twins(
    context: AssetExecutionContext,
    storage: Storage,
    family: str,
    jobs: list[TrainJob],
    trained: list[dict],
    references: list[TrainJob],
    refs: list[dict],
) -> list[dict]:
    """For each trained defended version with helpers trained under its defense: its adaptive twin, the same
    checkpoint as `<version>+adaptive` (facts: `attacker: adaptive`, `naive_version`, `references`: those
    helpers), whose calibrated attacks (offline LiRA, RMIA; M^4I's shadow classifiers and `m4i_loss_ref`) learn
    from those helpers."""
    by_defense: dict[tuple[str, float], list[str]] = {}
    for job, ref in zip(references, refs):
        by_defense.setdefault(job.defense[:2], []).append(ref["model_version"])
    twins = []
    for job, result in zip(jobs, trained):
        matching = by_defense.get(job.defense[:2])
        if not matching:
            continue
        naive = storage.repository.model_info(result["model_version"])
        facts = {**json.loads(naive.get("defense_facts") or "{}"), "attacker": "adaptive",
                 "naive_version": naive["model_version"], "references": sorted(matching)}  # fmt: skip
        twin = {**{k: v for k, v in naive.items() if k not in ("created_at",)},
                "model_version": f"{naive['model_version']}+adaptive", "train_fingerprint": None,
                "defense_facts": json.dumps(facts, default=str)}  # fmt: skip
        storage.write("models", pl.DataFrame([twin]), model_version=twin["model_version"])
        twins.append({"defense": job.defense[0], "strength": job.defense[1], "model_version": twin["model_version"],
                      "attacker": "adaptive", "references": sorted(matching)})  # fmt: skip
    add_versions(context.instance, family, [t["model_version"] for t in twins])
    return twins


def defend(
    context: AssetExecutionContext,
    settings: AuditSettings,
    storage: Storage,
    compute: Compute,
    family: str,
    defenses: dict[str, list[float]],
) -> MaterializeResult:
    """Register the release-time defenses of the family's latest target and train its training-time ones
    (the target's recipe on the members, one defense switched on; early stopping validates on population
    records, never on a candidate)."""
    target = latest_target(storage, settings.audit, family)
    base = FAMILIES[family].base_spec(settings)
    members = storage.repository.audit_records(settings.audit, ("member",))
    population = storage.repository.audit_records(settings.audit, ("population",), dataset=settings.main_dataset())
    validation = validation_sample(settings, population)
    released, jobs = [], []
    for defense, strength in grid(defenses, family):
        if is_release(defense):
            facts = {"release": RELEASE_DEFENSES[defense].description, "seed": settings.seed}
            version = storage.register_release(target, defense, strength, facts)
            released.append({"defense": defense, "strength": strength, "model_version": version, "release": True})
            if adaptive_queries(defense, settings.adaptive_queries) > 1:  # the attacker who knows the noise
                twin = {**facts, "attacker": "adaptive", "queries": settings.adaptive_queries,
                        "naive_version": version}  # fmt: skip
                twin_version = storage.register_release(target, defense, strength, twin)
                released.append({"defense": defense, "strength": strength, "model_version": twin_version,
                                 "release": True, "attacker": "adaptive"})  # fmt: skip
            continue
        spec = defense_spec(settings, base, defense, strength)
        jobs.append(TrainJob("defended", members, spec, defense=(defense, strength, target["model_version"]),
                             validation=validation if defense == "early_stopping" else None))  # fmt: skip
    references = adaptive_helper_jobs(settings, family, defenses, population, validation, target["model_version"])
    add_versions(context.instance, family, [r["model_version"] for r in released])
    skipped = plan_release_skips(storage, settings.audit, family, released)
    trained = train_and_register(context, settings, storage, compute, FAMILIES[family].models_module(),
                                 jobs + references)  # fmt: skip
    trained, refs = trained[: len(jobs)], trained[len(jobs) :]
    table = [{"defense": j.defense[0], "strength": j.defense[1], **r} for j, r in zip(jobs, trained)] + released
    table += register_adaptive_twins(context, storage, family, jobs, trained, references, refs)
    return MaterializeResult(
        metadata={
            "base_version": target["model_version"],
            "defended_versions": MetadataValue.json(table),
            "skipped_attacks": MetadataValue.json(skipped),
            "dagster/row_count": len(table),
        }
    )


def defended_asset(family: Family):
    """The defended versions of one family's target (`Family.defended`, e.g. `defended_clips`)."""

    text = (f"Defended versions of the {family.name} target at the strengths of `{family.name}_defenses`: the "
            "training-time defenses retrained, the release-time ones registered.")  # fmt: skip

    @asset(name=family.defended, group_name="defenses", deps=[family.models[0]], kinds={"pytorch"}, description=text)
    def _defended(
        context: AssetExecutionContext, settings: AuditSettings, storage: Storage, compute: Compute
    ) -> MaterializeResult:
        return defend(context, settings, storage, compute, family.name, family.defenses(settings))

    return _defended


defended_assets = [defended_asset(family) for family in FAMILIES.values()]


def measure_utility(step: Step) -> MaterializeResult:
    """What the model version is good for, measured on the audit's non-members (held out from the target's
    training): a CLIP's retrieval recall and zero-shot accuracy, a captioner's BLEU-4, ROUGE-L and CIDEr."""
    version, settings, storage, compute = step.version, step.settings, step.storage, step.compute
    info = storage.repository.model_info(version)
    naive = json.loads(info.get("defense_facts") or "{}").get("naive_version")
    if naive:  # an attacker's view of a release: its utility is the release's, measured on `naive`
        passed = AssetCheckResult(check_name="utility_in_range", passed=True, metadata={"utility_of": naive})
        return MaterializeResult(metadata={"dagster/row_count": 0, "utility_of": naive}, check_results=[passed])
    held = storage.repository.audit_records(info["audit"], ("nonmember",))
    measure = UTILITIES[FAMILIES[info["family"]].utility]
    values, chance = measure(storage.repository, settings, compute.torch_device, info, held)
    frame = pl.DataFrame({"model_version": version, "metric": list(values), "value": list(values.values()),
                          "chance": [chance.get(m) for m in values], "n_records": held.height,
                          "audit": info["audit"]}, schema_overrides={"chance": pl.Float64})  # fmt: skip
    storage.write("model_utility", frame, model_version=version)
    bounded = {k: v for k, v in values.items() if k != "cider"}
    passed = all(np.isfinite(list(values.values()))) and all(0 <= v <= 1 for v in bounded.values())
    return MaterializeResult(
        metadata={
            "dagster/row_count": frame.height,
            "n_records": held.height,
            **values,
            **{f"{k} (chance)": v for k, v in chance.items()},
        },
        check_results=[AssetCheckResult(check_name="utility_in_range", passed=bool(passed), metadata=values)],
    )


UTILITY_ASSET = VersionAsset(
    "model_utility",
    measure_utility,
    ("embeddings", "caption_metrics"),
    "defenses",
    frozenset({"duckdb"}),
    {"utility_in_range": ("every metric finite; recalls, accuracy, BLEU and ROUGE in [0, 1]", True)},
)


def empirical_epsilons(storage: Storage, versions: list[str], delta: float, seed: int) -> pl.DataFrame:
    """Per version: the empirical epsilon lower bound at `delta` from its strongest attack (picked on a held-out
    half of the candidates; Jagielski et al. 2020, Nasr et al. 2021), and that attack. Blind scores never count:
    they do not query the model."""
    from m4i_assets.metrics.privacy import empirical_epsilon

    scores = storage.repository.labelled_scores(versions, list(pu.NOT_AN_ATTACK))
    rows = []
    for (version,), frame in scores.group_by(["model_version"], maintain_order=True):
        wide = frame.pivot(on="attack", index=["record_id", "is_member"], values="score").drop_nulls()
        attacks = [c for c in wide.columns if c not in ("record_id", "is_member")]
        bound = empirical_epsilon(wide["is_member"].to_numpy(), {a: wide[a].to_numpy() for a in attacks}, delta,
                                  seed=seed)  # fmt: skip
        rows.append({"model_version": version, "epsilon_lb": bound.epsilon_lb, "epsilon_lb_attack": bound.attack})
    return pl.DataFrame(rows, schema={"model_version": pl.Utf8, "epsilon_lb": pl.Float64,
                                      "epsilon_lb_attack": pl.Utf8})  # fmt: skip


@asset(
    group_name="defenses",
    deps=[*(version_key(family, name) for family in FAMILIES for name in ("attack_metrics", "model_utility")),
          *defended_assets],
    kinds={"duckdb", "mlflow"},
    check_specs=[AssetCheckSpec("every_defense_evaluated", asset="defense_evaluations",
                                description="every defended version of each target has attack metrics and utility")],
)  # fmt: skip
def defense_evaluations(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage, tracking: Tracking
) -> MaterializeResult:
    """The privacy-utility table of each family's latest target and its defended versions (every attack's
    AUC and TPR@1%FPR with CIs, epsilon for DP-SGD, the primary utility), a privacy-utility plot per family,
    and the defense with the lowest worst-case TPR@1%FPR at most 10% below the target's utility."""
    tables, metadata, artifacts, missing = [], {}, {}, []
    for family in FAMILIES:
        if not storage.repository.latest_versions(settings.audit, "target", family=family):
            continue
        target = latest_target(storage, settings.audit, family)["model_version"]
        repo = storage.repository
        models = repo.defense_models(target)
        ids = models["model_version"].to_list()
        # TPR@1%FPR as attack_metrics reports it (NULL below 1000 non-members, the rules of evidence); the curves
        # read the TPR at the known non-members' 1% threshold with its Clopper-Pearson CI (`pu.PRIVACY`).
        metrics, utility = repo.of_versions("attack_metrics", ids), repo.of_versions("model_utility", ids)
        facts = {v: json.loads(f or "{}") for v, f in zip(ids, models["defense_facts"])}
        utility = pl.concat([utility, *(  # an adaptive attacker's view of a release has the release's utility
            utility.filter(pl.col("model_version") == f["naive_version"]).with_columns(model_version=pl.lit(v))
            for v, f in facts.items() if "naive_version" in f)])  # fmt: skip
        done = set(metrics["model_version"]) & set(utility["model_version"])
        missing += [v for v in ids if v not in done]
        if target not in done or len(done) < 2:
            context.log.warning(f"{family}: the target and at least one defended version need attack_metrics and "
                                f"model_utility first; audited so far: {sorted(done)}")  # fmt: skip
            continue
        rows = pu.defense_rows(models.filter(pl.col("model_version").is_in(done)), metrics, utility, family)
        rows = rows.join(empirical_epsilons(storage, sorted(done), settings.dp_delta, settings.seed),
                         on="model_version", how="left")  # fmt: skip
        tables.append(rows.with_columns(audit=pl.lit(settings.audit), family=pl.lit(family)))
        png = pu.privacy_utility_png(rows, f"{family} defenses, audit {settings.audit}")
        artifacts[f"privacy_utility_{family}.png"] = png
        best = pu.best_defense(rows)
        metadata[f"{family}_table"] = MetadataValue.md(pu.defense_markdown(rows))
        metadata[f"{family}_plot"] = MetadataValue.md(
            f"![{family}](data:image/png;base64,{base64.b64encode(png).decode()})"
        )
        metadata[f"{family}_best_within_10pct_utility"] = MetadataValue.json(best or {})
        skipped = repo.skipped_attacks(ids)
        metadata[f"{family}_skipped_attacks"] = MetadataValue.md("\n".join(
            ["| model version | attack | why skipped |", "|---|---|---|"]
            + [f"| {v} | {a} | {why} |" for v, a, why in skipped.iter_rows()]))  # fmt: skip
        points = pu.curve_points(rows)
        metadata[f"{family}_frontier_at_matched_utility"] = MetadataValue.md(pu.matched_utility_markdown(points))
        metadata[f"{family}_best_at_matched_utility"] = MetadataValue.json(pu.best_at_matched_utility(points))
    if not tables:
        raise ValueError("no family has an audited target and defended version yet: run the audits first")
    table = pl.concat(tables)
    artifacts["defense_evaluations.csv"] = table.write_csv().encode()
    run_id = tracking.log_run(
        run_name=f"{settings.audit}/defense_evaluations",
        params={"audit": settings.audit, "clip_defenses": settings.clip_defenses,
                "captioner_defenses": settings.captioner_defenses, "dp_delta": settings.dp_delta,
                "dp_max_grad_norm": settings.dp_max_grad_norm},
        metrics={metric_name(r, m): r[m] for r in table.to_dicts() for m in ("tpr_at_1pct_fpr", pu.PRIVACY, "auc")
                 if r[m] is not None},
        tags={"audit": settings.audit, "kind": "defense_evaluations", "dagster_run_id": context.run_id},
        artifacts=artifacts,
    )  # fmt: skip
    storage.write("defense_evaluations", table, audit=settings.audit)
    return MaterializeResult(
        metadata={"dagster/row_count": table.height, "mlflow_run_id": run_id, **metadata,
                  "not_yet_evaluated": MetadataValue.json(missing)},
        check_results=[AssetCheckResult(check_name="every_defense_evaluated", passed=not missing,
                                        metadata={"missing": MetadataValue.json(missing)})],
    )  # fmt: skip


defense_assets = [*defended_assets, defense_evaluations]
