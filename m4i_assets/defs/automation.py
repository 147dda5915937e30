"""Re-audits: one partitioned audit job per model family, a sensor on the watched models folder, and
a weekly schedule that re-audits the latest target of each family.

The watched folder is `$M4I_HOME/watched_models/`; each subfolder holds one checkpoint in a layout
`describe_checkpoint` knows:

- an open_clip CLIP: `model.json` with `{"family": "clip", "arch": <open_clip architecture>}` and exactly one
  weights file, `model.safetensors` (as the platform saves them) or a torch file `*.pt`, `*.pth`, `*.bin`
  (as open_clip's training writes them);
- a Hugging Face CLIP directory: `config.json` with model_type "clip", `model.safetensors` or
  `pytorch_model.bin`, tokenizer files and `preprocessor_config.json` or `processor_config.json` (arch:
  our `m4i.json`'s, else "hf-clip");
- a captioner: `model.safetensors` + `config.json`, this platform's CNN+LSTM or any Hugging Face
  VisionEncoderDecoder directory.

A new or changed checkpoint is copied under `models/`, registered as a `target` of the audit (its
`checkpoint_uri` the weights file, whose sha256 names the model version), added as a model-version
partition and audited; the cursor remembers each folder's weights file size, mtime and sha256, so an
unchanged folder launches nothing. A folder that is not a checkpoint is logged once per reason.
"""

import json
from pathlib import Path
from typing import NamedTuple

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
from m4i_assets.models.checkpoints import (
    WEIGHT_SUFFIXES,
    hf_clip_arch,
    hf_weights_file,
    read_json_object,
    sha256_file,
)
from m4i_assets.settings import AuditSettings

# What one audited model version materializes, per family (the demo CLI runs the same lists).
AUDIT_ASSETS = {
    "clip": ["model_checkpoint", "embeddings", "augmentation_deltas", "csa_scores", "aea_scores", "clip_loss_scores",
             "rmia_scores", "pseudo_labels", "wsa_attack_model", "wsa_scores", "ref_calibrated_scores",
             "blind_baseline_scores", "attack_metrics", "audit_report", "model_utility"],
    "captioner": ["model_checkpoint", "generated_captions", "caption_metrics", "caption_nll", "m4i_mb_scores",
                  "m4i_fb_scores", "m4i_loss_scores", "m4i_loss_ref_scores", "blind_baseline_scores",
                  "attack_metrics", "m4i_scenarios", "audit_report", "model_utility"],
}  # fmt: skip
audit_jobs = {
    family: define_asset_job(
        f"{family}_audit",
        selection=AssetSelection.assets(*keys),
        partitions_def=model_versions,
        description=f"The full audit of one {family} model version (its partition).",
        tags={"m4i/stage": "audit"},  # the instance's run queue limits concurrent audits by this tag
    )
    for family, keys in AUDIT_ASSETS.items()
}
WATCHED = "watched_models"


class WatchedCheckpoint(NamedTuple):
    """A watched folder's model family, arch and weights file (whose sha256 names the version)."""

    family: str
    arch: str
    weights: Path


def _required(weights: Path | None, folder: Path, expected: str) -> Path:
    if weights is None or not weights.is_file():
        raise ValueError(f"{folder}: no {expected}")
    return weights


def _single_weights_file(folder: Path) -> Path:
    """The one weights file of an open_clip folder (`model.safetensors`, `*.pt`, `*.pth` or `*.bin`)."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) > 1:
        raise ValueError(f"{folder}: {len(found)} weights files ({', '.join(p.name for p in found)}), expected one")
    return _required(found[0] if found else None, folder, "weights file (model.safetensors, *.pt, *.pth or *.bin)")


def describe_checkpoint(folder: Path) -> WatchedCheckpoint:
    """(family, arch, weights file) of a checkpoint folder in a layout of the module docstring; a ValueError
    naming the folder or file when it is not one."""
    for name in ("model.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        config = read_json_object(path)
        if config.get("family") == "clip" and isinstance(config.get("arch"), str):
            return WatchedCheckpoint("clip", config["arch"], _single_weights_file(folder))
        if config.get("model_type") == "clip":
            weights = _required(hf_weights_file(folder), folder, "model.safetensors (nor pytorch_model.bin)")
            return WatchedCheckpoint("clip", hf_clip_arch(folder), weights)
        if config.get("family") == "captioner":
            arch = config.get("spec", {}).get("arch", "cnn-lstm")
            return WatchedCheckpoint(
                "captioner", arch, _required(folder / "model.safetensors", folder, "model.safetensors")
            )
        if config.get("model_type") == "vision-encoder-decoder":
            arch = "vit-gpt2" if (folder / "m4i.json").is_file() else "hf-vision-encoder-decoder"
            return WatchedCheckpoint(
                "captioner", arch, _required(folder / "model.safetensors", folder, "model.safetensors")
            )
    raise ValueError(
        f"{folder}: neither model.json (an open_clip CLIP: family, arch) nor config.json (a Hugging Face CLIP, "
        "or a captioner)"
    )


def register_watched(storage: Storage, audit: str, folder: Path, checkpoint: WatchedCheckpoint, sha: str) -> str:
    """Copy a watched checkpoint folder under `models/<version>/` and register it as a target of `audit`."""
    row = {"family": checkpoint.family, "arch": checkpoint.arch, "role": "target", "audit": audit,
           "train_config": json.dumps({"source": str(folder)})}  # fmt: skip
    weights = checkpoint.weights.relative_to(folder).as_posix()
    return storage.register_model(folder, sha, row, move=False, weights=weights)


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
        try:
            checkpoint = describe_checkpoint(folder)
        except ValueError as exc:  # still being copied, or not a checkpoint: said once per reason
            if seen.get(folder.name) != [str(exc)]:
                context.log.warning(f"skipping {folder}: {exc}")
            seen[folder.name] = [str(exc)]
            continue
        stat = checkpoint.weights.stat()
        previous = seen.get(folder.name)
        if previous and previous[:2] == [stat.st_size, stat.st_mtime_ns]:
            continue  # unchanged since the last tick: not even re-hashed
        sha = sha256_file(checkpoint.weights)
        seen[folder.name] = [stat.st_size, stat.st_mtime_ns, sha]
        if previous and len(previous) == 3 and previous[2] == sha:
            continue  # touched, same bytes
        version = register_watched(storage, settings.audit, folder, checkpoint, sha)
        versions.append(version)
        runs.append(RunRequest(run_key=version, partition_key=version, job_name=audit_jobs[checkpoint.family].name))
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
