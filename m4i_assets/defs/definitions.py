"""Build the Dagster `Definitions` of the platform for one `$M4I_HOME` and settings profile."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dagster import AssetsDefinition, Definitions, ExecutorDefinition, multi_or_in_process_executor

from m4i_assets.defs.assets import attacks, audits, captioning, data, defenses, evaluation, models, signals
from m4i_assets.defs.automation import audit_jobs, reaudit_sensors, watched_models_sensor
from m4i_assets.defs.partitions import VersionAsset, version_asset
from m4i_assets.defs.resources import Compute, Storage, Tracking
from m4i_assets.families import FAMILIES, Family
from m4i_assets.settings import AuditSettings, m4i_home, settings_for

MAX_CONCURRENT_STEPS = 2
REPO = Path(__file__).resolve().parents[2]

# Every per-version asset, by name: built for each family whose registry entry lists it (`Family.job_assets`),
# as `<family>/<name>` partitioned by that family's audited versions, so no asset exists for a family that would
# have to refuse its versions. The few that are not one `VersionAsset` (the checkpoint, whose deps are the
# family's training assets; the captioner's one-step multi-asset of four scores) and the helper assets are
# factories of a `Family`.
VERSION_ASSETS: dict[str, VersionAsset | Callable[[Family], AssetsDefinition]] = {
    **{
        spec.name: spec
        for module in (signals, attacks, captioning, evaluation, audits)
        for spec in module.VERSION_ASSETS
    },
    defenses.UTILITY_ASSET.name: defenses.UTILITY_ASSET,
    "model_checkpoint": models.model_checkpoint,
    **dict.fromkeys(captioning.SCORE_ASSETS, captioning.m4i_scores),
    "reference_embeddings": signals.reference_embeddings,
    "m4i_attack_models": captioning.m4i_attack_models,
}


def family_assets(family: Family, shards: int) -> list[AssetsDefinition]:
    """Every asset of one family: its helper asset and its per-version assets (the sharded signals in `shards`
    record shards), each built once."""
    entries = dict.fromkeys(VERSION_ASSETS[name] for name in (family.helper_asset, *family.job_assets()))
    return [version_asset(e, family, shards) if isinstance(e, VersionAsset) else e(family) for e in entries]


def audit_graph(shards: int) -> list[AssetsDefinition]:
    """Everything but the ingestion assets (whose partitions are the audit's source shards), with the sharded
    signals in `shards` record shards."""
    return [
        data.record_roles,
        audits.audit_plan,
        *models.training_assets,
        *defenses.defense_assets,
        *(asset for family in FAMILIES.values() for asset in family_assets(family, shards)),
    ]


def build_resources(home: Path | None = None, settings: AuditSettings | None = None) -> dict:
    """Storage and MLflow under `home` (default `$M4I_HOME`), `settings` (default: the `$M4I_PROFILE`
    profile), and the compute placement."""
    home = (home or m4i_home()).resolve()
    return {
        "settings": settings or settings_for(),
        "storage": Storage(home=str(home)),
        "compute": Compute(concurrent_steps=MAX_CONCURRENT_STEPS),
        "tracking": Tracking(
            tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=str(home / "mlflow-artifacts")
        ),
    }


def build_assets(resources: dict) -> list:
    """The platform's assets for these resources: ingestion partitioned by the sources' shards, then the rest
    (the settings' `record_shards`)."""
    settings = resources["settings"]
    return [*data.ingestion_assets(data.audit_sources(settings, resources["storage"])),
            *audit_graph(settings.record_shards)]  # fmt: skip


def build_executor(name: str | None = None) -> ExecutorDefinition:
    """The executor of every run, by `M4I_EXECUTOR`: unset, the multiprocess executor (or in process when a run's
    config asks); `celery`, dagster-celery's, configured by `M4I_CELERY_CONFIG` (default `deploy/celery.yaml`,
    whose broker and backend come from the environment): steps run on `dagster-celery worker` processes."""
    name = name or os.environ.get("M4I_EXECUTOR", "multiprocess")
    if name == "multiprocess":
        return multi_or_in_process_executor
    if name != "celery":
        raise ValueError(f"M4I_EXECUTOR={name!r}: expected multiprocess or celery")
    import yaml
    from dagster_celery import celery_executor

    path = Path(os.environ.get("M4I_CELERY_CONFIG", REPO / "deploy" / "celery.yaml"))
    return celery_executor.configured(yaml.safe_load(path.read_text())["execution"]["config"], name="celery")


def build_definitions(home: Path | None = None, settings: AuditSettings | None = None) -> Definitions:
    """All assets with their resources, the per-family audit and signals jobs, the watched-models sensor and the
    weekly re-audit sensors. A run's steps run in parallel processes by default, or in process when its run
    config asks (`execution: {config: {in_process: {}}}`, as the CLI's backfills of partitions do), or on Celery
    workers (`build_executor`)."""
    resources = build_resources(home, settings)
    return Definitions(
        assets=build_assets(resources),
        jobs=audit_jobs,
        sensors=[watched_models_sensor, *reaudit_sensors],
        resources=resources,
        executor=build_executor(),
    )
