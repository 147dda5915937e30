import pytest
from dagster import AssetKey, Definitions

from m4i_assets.defs.definitions import build_definitions
from m4i_assets.settings import settings_for


def test_definitions_load(tmp_path, monkeypatch):
    monkeypatch.setenv("M4I_HOME", str(tmp_path))
    import definitions  # the file workspace.yaml loads

    assert isinstance(definitions.defs, Definitions)
    graph = build_definitions(home=tmp_path).resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {
        "source_shards",
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
        "target_captioner",
        "null_control_captioner",
        "shadow_captioners",
        "generated_captions",
        "caption_metrics",
        "m4i_attack_models",
        "m4i_mb_scores",
        "m4i_fb_scores",
        "m4i_scenarios",
    } <= keys
    assert graph.get(AssetKey("embeddings")).partitions_def.name == "model_versions"


def test_settings_overrides_from_the_environment(monkeypatch):
    monkeypatch.setenv("M4I_SETTINGS", '{"captioner_arch": "vit-gpt2", "n_bootstrap": 10}')
    settings = settings_for("tiny")
    assert (settings.captioner_arch, settings.n_bootstrap, settings.audit) == ("vit-gpt2", 10, "tiny")
    for bad, message in (("{nope", "not JSON"), ("[1]", "JSON object"), ('{"nope": 1}', "unknown settings")):
        monkeypatch.setenv("M4I_SETTINGS", bad)
        with pytest.raises(ValueError, match=message):
            settings_for("tiny")
