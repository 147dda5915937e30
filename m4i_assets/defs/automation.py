"""Re-audits: one partitioned audit job per model family, a sensor on the watched models folder, and
a weekly schedule that re-audits the latest target of each family.

The watched folder is `$M4I_HOME/watched_models/`; each subfolder holds one checkpoint in a layout
`describe_checkpoint` knows (a CLIP: `model.safetensors` + `model.json` naming `arch`, as the platform
saves them; a captioner: `model.safetensors` + `config.json`, this platform's CNN+LSTM or any Hugging
Face VisionEncoderDecoder directory). A new or changed checkpoint is copied under `models/`,
registered as a `target` of the audit, added as a model-version partition and audited; the cursor
remembers each folder's size, mtime and sha256, so an unchanged folder launches nothing.
"""

import json
from pathlib import Path

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    schedule,
    sensor,
)

from m4i_assets.defs.partitions import model_versions
from m4i_assets.defs.resources import Storage
from m4i_assets.models.checkpoints import sha256_file
from m4i_assets.settings import AuditSettings

# What one audited model version materializes, per family (the demo CLI runs the same lists).
AUDIT_ASSETS = {
    "clip": ["model_checkpoint", "embeddings", "augmentation_deltas", "csa_scores", "aea_scores", "pseudo_labels",
             "wsa_attack_model", "wsa_scores", "ref_calibrated_scores", "blind_baseline_scores", "attack_metrics",
             "audit_report"],
    "captioner": ["model_checkpoint", "generated_captions", "caption_metrics", "m4i_mb_scores", "m4i_fb_scores",
                  "blind_baseline_scores", "attack_metrics", "m4i_scenarios", "audit_report"],
}  # fmt: skip
audit_jobs = {
    family: define_asset_job(
        f"{family}_audit",
        selection=AssetSelection.assets(*keys),
        partitions_def=model_versions,
        description=f"The full audit of one {family} model version (its partition).",
    )
    for family, keys in AUDIT_ASSETS.items()
}
WATCHED = "watched_models"


def describe_checkpoint(folder: Path) -> tuple[str, str]:
    """(family, arch) of a checkpoint folder; a ValueError naming the folder when it is not one."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{folder}: no model.safetensors")
    for name in ("model.json", "config.json"):
        path = folder / name
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except ValueError as exc:
                raise ValueError(f"{path} is not JSON: {exc}") from exc
            if config.get("family") == "clip" and "arch" in config:
                return "clip", config["arch"]
            if config.get("family") == "captioner":
                return "captioner", config.get("spec", {}).get("arch", "cnn-lstm")
            if config.get("model_type") == "vision-encoder-decoder":
                return "captioner", "vit-gpt2" if (folder / "m4i.json").is_file() else "hf-vision-encoder-decoder"
    raise ValueError(f"{folder}: neither model.json (a CLIP: family, arch) nor a captioner config.json")


def register_watched(storage: Storage, audit: str, folder: Path, sha: str) -> tuple[str, str]:
    """Copy a watched checkpoint folder under `models/<version>/` and register it as a target of `audit`."""
    family, arch = describe_checkpoint(folder)
    row = {"family": family, "arch": arch, "role": "target", "audit": audit,
           "train_config": json.dumps({"source": str(folder)})}  # fmt: skip
    return family, storage.register_model(folder, sha, row, move=False)


@sensor(
    jobs=list(audit_jobs.values()),
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.STOPPED,
    description="Audits every new or changed checkpoint dropped in $M4I_HOME/watched_models/<name>/.",
)
def watched_models_sensor(context: SensorEvaluationContext, storage: Storage, settings: AuditSettings):
    seen: dict[str, list] = json.loads(context.cursor or "{}")
    watch = storage.root / WATCHED
    runs, versions = [], []
    for folder in sorted(p for p in watch.glob("*") if p.is_dir()) if watch.is_dir() else []:
        weights = folder / "model.safetensors"
        if not weights.is_file():
            continue  # still being copied, or not a checkpoint
        stat = weights.stat()
        previous = seen.get(folder.name)
        if previous and previous[:2] == [stat.st_size, stat.st_mtime_ns]:
            continue  # unchanged since the last tick: not even re-hashed
        sha = sha256_file(weights)
        seen[folder.name] = [stat.st_size, stat.st_mtime_ns, sha]
        if previous and previous[2] == sha:
            continue
        try:
            family, version = register_watched(storage, settings.audit, folder, sha)
        except ValueError as exc:
            context.log.warning(f"skipping {folder}: {exc}")
            continue
        versions.append(version)
        runs.append(RunRequest(run_key=version, partition_key=version, job_name=audit_jobs[family].name))
    return SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[model_versions.build_add_request(versions)] if versions else [],
        cursor=json.dumps(seen, sort_keys=True),
    )


def reaudit_schedule(family: str):
    """A weekly re-audit (Monday 03:00) of the latest target of one family in the audit."""

    @schedule(
        name=f"weekly_{family}_reaudit",
        job=audit_jobs[family],
        cron_schedule="0 3 * * 1",
        default_status=DefaultScheduleStatus.STOPPED,
        description=f"Re-audits the latest {family} target every week.",
    )
    def _schedule(context: ScheduleEvaluationContext, storage: Storage, settings: AuditSettings):
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
        return [
            RunRequest(run_key=f"{version}@{tick}", partition_key=version)
            for version in storage.latest_versions(settings.audit, "target", family=family)
        ]

    return _schedule


reaudit_schedules = [reaudit_schedule(family) for family in AUDIT_ASSETS]
