"""Re-audits: the watched-models sensor and the weekly re-audit sensors, through Dagster's testing APIs: each asks
for one backfill per version, its signals shard by shard and then the rest of its audit."""

import json
import os
from datetime import UTC, datetime

import pytest
from dagster import DagsterInstance, build_sensor_context

from m4i_assets.defs.automation import (
    describe_checkpoint,
    last_reaudit_time,
    reaudit_sensors,
    watched_models_sensor,
)
from m4i_assets.defs.definitions import build_definitions
from m4i_assets.defs.resources import Storage
from m4i_assets.models import clip
from m4i_assets.settings import PROFILES, AuditSettings, settings_for


def drop_clip(home, name: str, seed: int):
    bundle = clip.build_clip("m4i-tiny-vit", seed=seed)
    _, sha = clip.save_clip(bundle, home / "watched_models" / name, {"note": "dropped by a test"})
    return sha


def context(storage, settings, cursor=None):
    return build_sensor_context(
        instance=DagsterInstance.ephemeral(), cursor=cursor, resources={"storage": storage, "settings": settings},
        repository_def=build_definitions(home=storage.root, settings=settings).get_repository_def(),
    )  # fmt: skip


def tick(storage, settings, cursor=None):
    return watched_models_sensor(context(storage, settings, cursor))


def partitions(request) -> dict[str, set[str]]:
    """The partitions a backfill request targets, by asset key."""
    subset = request.asset_graph_subset
    return {key.to_user_string(): set(subset.get_partitions_subset(key).get_partition_keys())
            for key in subset.asset_keys}  # fmt: skip


def test_sensor_audits_new_checkpoints_once(tmp_path):
    storage, settings = Storage(home=str(tmp_path)), settings_for("tiny")
    empty = tick(storage, settings)
    assert empty.run_requests == [] and empty.dynamic_partitions_requests == []

    sha = drop_clip(tmp_path, "first", seed=1)
    first = tick(storage, settings, empty.cursor)
    [request] = first.run_requests
    version = f"clip-{sha[:12]}@tiny"
    assert request.tags["m4i/version"] == version and request.requires_backfill_daemon()
    targeted = partitions(request)  # one backfill: the version's shard of signals, then every other asset of it
    assert targeted["clip/embeddings"] == targeted["clip/augmentation_deltas"] == {f"0|{version}"}
    assert targeted["clip/csa_scores"] == targeted["clip/attack_metrics"] == {version}
    assert "clip/membership_rate" not in targeted  # a controlled audit is labelled
    assert list(first.dynamic_partitions_requests[0].partition_keys) == [version]
    row = storage.repository.model_info(version)
    assert (row["family"], row["arch"], row["role"], row["audit"]) == ("clip", "m4i-tiny-vit", "target", "tiny")
    assert row["checkpoint_uri"].startswith(str(storage.models_dir))  # copied: deleting the drop breaks nothing

    again = tick(storage, settings, first.cursor)
    assert again.run_requests == []  # an unchanged folder launches nothing

    os.utime(tmp_path / "watched_models" / "first" / "model.safetensors")  # touched, same bytes
    touched = tick(storage, settings, again.cursor)
    assert touched.run_requests == []

    (tmp_path / "watched_models" / "junk").mkdir()
    (tmp_path / "watched_models" / "junk" / "model.safetensors").write_bytes(b"not a model")
    second_sha = drop_clip(tmp_path, "second", seed=2)
    second = tick(storage, settings, touched.cursor)
    assert [r.tags["m4i/version"] for r in second.run_requests] == [f"clip-{second_sha[:12]}@tiny"]  # junk skipped


def test_describe_checkpoint_names_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="none of model.json, config.json, open_clip_config.json.*supported: clip"):
        describe_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="none of model.json"):
        describe_checkpoint(tmp_path)
    # a directory of another kind: its model_type, and what is supported, never a KeyError
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(
        ValueError,
        match=r"config.json \(model_type 'bert', architectures \['BertModel'\]\): not a "
        r"model M4I audits; supported: clip: .*captioner: ",
    ):
        describe_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "model.json").write_text("{broken")
    with pytest.raises(ValueError, match="is not valid JSON"):
        describe_checkpoint(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"family": "clip", "arch": "m4i-tiny-rn"}))
    assert describe_checkpoint(tmp_path) == ("clip", "m4i-tiny-rn", tmp_path / "model.safetensors")
    (tmp_path / "epoch_3.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"2 weights files \(epoch_3.pt, model.safetensors\)"):
        describe_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    assert describe_checkpoint(tmp_path).weights == tmp_path / "epoch_3.pt"
    (tmp_path / "epoch_3.pt").unlink()
    with pytest.raises(ValueError, match="no weights file"):
        describe_checkpoint(tmp_path)


def test_weekly_sensors_reaudit_the_latest_target_once_a_week(tmp_path):
    storage, settings = Storage(home=str(tmp_path)), AuditSettings(**{**PROFILES["tiny"], "record_shards": 2})
    drop_clip(tmp_path, "first", seed=1)
    version = tick(storage, settings).run_requests[0].tags["m4i/version"]
    by_name = {s.name: s for s in reaudit_sensors}
    first = context(storage, settings)  # a first tick notes the latest cron time and fires nothing
    assert "next re-audit after" in by_name["weekly_clip_reaudit"](first).skip_message
    assert first.cursor == last_reaudit_time(datetime.now(UTC)).isoformat()
    due = context(storage, settings, cursor="2026-11-16T03:00:00+00:00")  # a week (or more) later
    [request] = by_name["weekly_clip_reaudit"](due)
    assert request.tags["m4i/version"] == version and due.cursor == first.cursor
    assert partitions(request)["clip/embeddings"] == {f"0|{version}", f"1|{version}"}  # each of two shards
    assert partitions(request)["clip/attack_metrics"] == {version}
    assert by_name["weekly_captioner_reaudit"](context(storage, settings, "2026-11-16")) == []  # no captioner target
    assert last_reaudit_time(datetime(2026, 11, 23, 3, tzinfo=UTC)) == datetime(2026, 11, 23, 3, tzinfo=UTC)
    assert last_reaudit_time(datetime(2026, 11, 23, 2, 59, tzinfo=UTC)) == datetime(2026, 11, 16, 3, tzinfo=UTC)
    assert last_reaudit_time(datetime(2026, 11, 29, 23, tzinfo=UTC)) == datetime(2026, 11, 23, 3, tzinfo=UTC)
