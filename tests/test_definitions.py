import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, Definitions

from m4i_assets.defs.definitions import build_definitions
from m4i_assets.families import FAMILIES
from m4i_assets.settings import settings_for


def test_definitions_load(tmp_path, monkeypatch):
    monkeypatch.setenv("M4I_HOME", str(tmp_path))
    import definitions  # the file workspace.yaml loads

    assert isinstance(definitions.defs, Definitions)
    graph = build_definitions(home=tmp_path).resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {
        "source_shards", "records", "record_roles", "target_clip", "null_control_clip", "reference_clips",
        "reference_embeddings", "target_captioner", "null_control_captioner", "shadow_captioners", "m4i_attack_models",
        "clip/model_checkpoint", "clip/embeddings", "clip/csa_scores", "clip/attack_metrics",
        "clip/augmentation_deltas", "clip/aea_scores", "clip/pseudo_labels", "clip/wsa_attack_model", "clip/wsa_scores",
        "clip/ref_calibrated_scores", "clip/blind_baseline_scores", "clip/audit_report", "captioner/model_checkpoint",
        "captioner/generated_captions", "captioner/caption_metrics", "captioner/m4i_mb_scores",
        "captioner/m4i_fb_scores", "captioner/m4i_scenarios", "captioner/attack_metrics", "captioner/audit_report",
    } <= keys  # fmt: skip
    # each family's per-version assets are partitioned by its own audited versions only, and no asset of one
    # family is offered the other's versions (nor a helper's: helpers are no partitions); its model-forward
    # signals by version x record shard
    sharded = {f"{name}/{signal}" for name, family in FAMILIES.items() for signal in family.sharded}
    assert {"clip/embeddings", "clip/augmentation_deltas", "captioner/generated_captions"} <= sharded
    for key in keys:
        partitions = graph.get(AssetKey.from_user_string(key)).partitions_def
        if key in sharded:
            dims = {d.name: d.partitions_def for d in partitions.partitions_defs}
            assert dims["version"].name == f"{key.split('/')[0]}_versions", key
            assert dims["shard"].get_partition_keys() == ["0"], key  # the default profile: one shard
        elif "/" in key:
            assert partitions.name == f"{key.split('/')[0]}_versions", key
        else:
            assert partitions is None or key == "source_shards", key
    assert not {k for k in keys if k.startswith("captioner/")} & {"captioner/embeddings", "captioner/csa_scores"}
    assert not {"clip/generated_captions", "clip/m4i_mb_scores"} & keys


MODEL_LIBRARIES = ("torch", "torchvision", "sklearn", "transformers", "open_clip", "mlflow", "safetensors")


def test_definitions_load_without_the_model_libraries(tmp_path):
    """Every Dagster process (the daemon, each run and each step) loads the definitions; a step imports the
    model libraries its own work needs, when it runs: a metrics step never waits for torch."""
    code = ("import sys, definitions; "
            f"print(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"M4I_HOME": str(tmp_path), "PATH": ""}, cwd=Path(__file__).parents[1])  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_helper_dependencies_are_lineage(tmp_path):
    """The attacks that learn from helper models read them through declared dependencies: the calibrated CLIP
    attacks and the blind baseline on the reference CLIPs' embeddings, the captioner's scores on the shadows'
    attack models; so one run of the models and the helpers needs no hand-kept order."""
    from m4i_assets.defs.definitions import build_definitions

    graph = build_definitions(home=tmp_path).resolve_asset_graph()

    def parents(key: str) -> set[str]:
        return {k.to_user_string() for k in graph.get(AssetKey.from_user_string(key)).parent_keys}

    assert "reference_embeddings" in parents("clip/rmia_scores") & parents("clip/ref_calibrated_scores")
    assert "reference_embeddings" in parents("clip/blind_baseline_scores")
    assert "m4i_attack_models" in parents("captioner/m4i_mb_scores") & parents("captioner/m4i_loss_ref_scores")
    assert {"reference_clips", "defended_clips"} <= parents("reference_embeddings")
    assert {"shadow_captioners", "defended_captioners"} <= parents("m4i_attack_models")


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


def test_every_job_and_sensor_resolves(tmp_path):
    """Each family's signals job resolves over its sharded signals (version x shard), its audit job over the rest
    of the family's assets (as the registry lists them), and the watched-models and weekly re-audit sensors
    load (they request backfills, so they target no job)."""
    defs = build_definitions(home=tmp_path)
    for name, family in FAMILIES.items():
        job = defs.resolve_job_def(f"{name}_audit")
        assert job.partitions_def.name == f"{name}_versions"
        assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {
            f"{name}/{asset}" for asset in family.job_assets() if asset not in family.sharded
        }
        signals = defs.resolve_job_def(f"{name}_signals")
        assert {d.name for d in signals.partitions_def.partitions_defs} == {"version", "shard"}
        assert {k.to_user_string() for k in signals.asset_layer.executable_asset_keys} == {
            f"{name}/{asset}" for asset in family.sharded
        }
        assert defs.resolve_sensor_def(f"weekly_{name}_reaudit").minimum_interval_seconds == 600
    assert defs.resolve_sensor_def("watched_models_sensor").minimum_interval_seconds == 30
