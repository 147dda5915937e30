"""Model versions: training registers a hashed checkpoint as a dynamic partition; an identical
re-run reuses it instead of training again; `retrain` forces a new training."""

from conftest import ingest
from dagster import DagsterInstance, materialize

from m4i_assets.defs.definitions import build_assets, build_resources
from m4i_assets.defs.partitions import VERSION_PARTITIONS
from m4i_assets.settings import PROFILES, AuditSettings


def _train(resources, instance):
    result = materialize(build_assets(resources), resources=resources, instance=instance, selection=["target_clip"])
    (event,) = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_identical_training_is_reused_and_retrain_forces_it(tmp_path):
    settings = AuditSettings(**{**PROFILES["tiny"], "audit": "registry"})
    resources = build_resources(home=tmp_path, settings=settings)
    instance = DagsterInstance.ephemeral()
    ingest(resources, instance)
    first = _train(resources, instance)
    again = _train(resources, instance)
    assert first["reused"] is False and again["reused"] is True
    assert again["model_version"] == first["model_version"]
    assert instance.get_dynamic_partitions(VERSION_PARTITIONS["clip"].name) == [first["model_version"]]

    forced = _train(
        build_resources(home=tmp_path, settings=AuditSettings(**{**settings.model_dump(), "retrain": True})), instance
    )
    assert forced["reused"] is False
    # CPU training is deterministic: the same recipe and records give the same bytes, so the same version
    assert forced["model_version"] == first["model_version"]
    rows = resources["storage"].read("SELECT model_version, sha256, role FROM models")
    assert rows.height == 1 and rows["model_version"][0] == f"clip-{rows['sha256'][0][:12]}@registry"
