"""The blind-baseline shift gate fires on a deliberately shifted non-member set and blocks the report."""

from conftest import ingest
from dagster import AssetKey, DagsterInstance, materialize

from m4i_assets.defs.definitions import build_resources
from m4i_assets.defs.partitions import VERSION_PARTITIONS
from m4i_assets.settings import PROFILES, AuditSettings


def test_shift_gate_fails_and_blocks_the_report_on_shifted_nonmembers(tmp_path):
    settings = AuditSettings(**{**PROFILES["tiny"], "audit": "shifted", "shifted_nonmembers": True})
    resources = build_resources(home=tmp_path, settings=settings)
    instance = DagsterInstance.ephemeral()
    assets = ingest(resources, instance)
    assert materialize(assets, resources=resources, instance=instance, selection=["target_clip"]).success
    (version,) = instance.get_dynamic_partitions(VERSION_PARTITIONS["clip"].name)
    embedded = materialize(assets, resources=resources, instance=instance, partition_key=f"0|{version}",
                           selection=["clip/embeddings"])  # its one record shard  # fmt: skip
    assert embedded.success
    audit = materialize(
        assets, resources=resources, instance=instance, partition_key=version, raise_on_error=False,
        selection=[f"clip/{name}" for name in ("model_checkpoint", "csa_scores", "blind_baseline_scores",
                                               "attack_metrics", "audit_report")],
    )  # fmt: skip
    gate = [e for e in audit.get_asset_check_evaluations() if e.check_name == "shift_gate"]
    assert len(gate) == 1 and not gate[0].passed
    assert "differ in distribution" in gate[0].description
    materialized = {e.asset_key for e in audit.get_asset_materialization_events()}
    assert AssetKey(["clip", "attack_metrics"]) in materialized
    assert AssetKey(["clip", "audit_report"]) not in materialized
    roles = resources["storage"].read("SELECT r.dataset, x.role, count(*) AS n FROM record_roles x JOIN records r "
                                      "USING (record_id) GROUP BY ALL ORDER BY ALL")  # fmt: skip
    assert ("synthetic_shapes_shifted", "nonmember", 48) in roles.rows()
