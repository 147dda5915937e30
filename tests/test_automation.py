"""Re-audits: the watched-models sensor and the weekly schedules, through Dagster's testing APIs."""

import json
import os
from datetime import UTC, datetime

import pytest
from dagster import DagsterInstance, build_schedule_context, build_sensor_context

from m4i_assets.defs.automation import describe_checkpoint, reaudit_schedules, watched_models_sensor
from m4i_assets.defs.resources import Storage
from m4i_assets.models import clip
from m4i_assets.settings import settings_for


def drop_clip(home, name: str, seed: int):
    bundle = clip.build_clip("m4i-tiny-vit", seed=seed)
    _, sha = clip.save_clip(bundle, home / "watched_models" / name, {"note": "dropped by a test"})
    return sha


def tick(storage, settings, cursor=None):
    context = build_sensor_context(
        instance=DagsterInstance.ephemeral(), cursor=cursor, resources={"storage": storage, "settings": settings}
    )
    return watched_models_sensor(context)


def test_sensor_audits_new_checkpoints_once(tmp_path):
    storage, settings = Storage(home=str(tmp_path)), settings_for("tiny")
    empty = tick(storage, settings)
    assert empty.run_requests == [] and empty.dynamic_partitions_requests == []

    sha = drop_clip(tmp_path, "first", seed=1)
    first = tick(storage, settings, empty.cursor)
    [request] = first.run_requests
    assert request.partition_key == f"clip-{sha[:12]}@tiny" and request.job_name == "clip_audit"
    assert list(first.dynamic_partitions_requests[0].partition_keys) == [request.partition_key]
    row = storage.repository.model_info(request.partition_key)
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
    assert [r.partition_key for r in second.run_requests] == [f"clip-{second_sha[:12]}@tiny"]  # junk skipped


def test_describe_checkpoint_names_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="neither model.json"):
        describe_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither model.json"):
        describe_checkpoint(tmp_path)
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


def test_weekly_schedules_reaudit_the_latest_target(tmp_path):
    storage, settings = Storage(home=str(tmp_path)), settings_for("tiny")
    drop_clip(tmp_path, "first", seed=1)
    result = tick(storage, settings)
    version = result.run_requests[0].partition_key
    when = datetime(2026, 11, 23, 3, tzinfo=UTC)
    by_name = {s.name: s for s in reaudit_schedules}
    resources = {"storage": storage, "settings": settings}
    context = build_schedule_context(resources=resources, scheduled_execution_time=when)
    [request] = by_name["weekly_clip_reaudit"](context)
    assert request.partition_key == version and request.run_key == f"{version}@{when.isoformat()}"
    assert by_name["weekly_captioner_reaudit"](context) == []  # no captioner target registered
    assert by_name["weekly_clip_reaudit"].cron_schedule == "0 3 * * 1"
