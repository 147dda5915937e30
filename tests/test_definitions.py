from dagster import AssetKey, Definitions

from m4i_assets.defs.definitions import build_definitions


def test_definitions_load(tmp_path, monkeypatch):
    monkeypatch.setenv("M4I_HOME", str(tmp_path))
    import definitions  # the file workspace.yaml loads

    assert isinstance(definitions.defs, Definitions)
    graph = build_definitions(home=tmp_path).resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {
        "corpus",
        "records",
        "record_roles",
        "target_clip",
        "null_control_clip",
        "model_checkpoint",
        "embeddings",
        "csa_scores",
        "attack_metrics",
        "reference_clips",
        "augmentation_deltas",
        "aea_scores",
        "pseudo_labels",
        "wsa_attack_model",
        "wsa_scores",
        "ref_calibrated_scores",
        "blind_baseline_scores",
        "audit_report",
    } <= keys
    assert graph.get(AssetKey("embeddings")).partitions_def.name == "model_versions"
