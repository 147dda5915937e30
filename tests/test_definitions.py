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


def test_tracking_makes_metric_names_mlflow_accepts(tmp_path):
    """A release-time defense's version carries `+` and `=`, which MLflow refuses in metric names."""
    import mlflow

    from m4i_assets.defs.resources import Tracking

    tracking = Tracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "artifacts"))
    run_id = tracking.log_run("r", params={}, metrics={"clip-ab+embedding_noise=0.05.csa": 0.5}, tags={},
                              artifacts={})  # fmt: skip
    run = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.data.metrics == {"clip-ab_embedding_noise_0.05.csa": 0.5}


def test_every_job_sensor_and_schedule_resolves(tmp_path):
    """Each family's audit job resolves over the family's assets (as the registry lists them), and the sensor
    and the weekly schedules resolve against those jobs."""
    from m4i_assets.families import FAMILIES

    defs = build_definitions(home=tmp_path)
    for name, family in FAMILIES.items():
        job = defs.resolve_job_def(f"{name}_audit")
        assert job.partitions_def.name == "model_versions"
        assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == set(family.job_assets())
        assert defs.resolve_schedule_def(f"weekly_{name}_reaudit").job_name == job.name
    sensor = defs.resolve_sensor_def("watched_models_sensor")
    assert {j.name for j in sensor.jobs} == {f"{name}_audit" for name in FAMILIES}
