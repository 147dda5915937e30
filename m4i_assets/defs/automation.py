"""Re-audits: one partitioned audit job per model family, a sensor on the watched models folder, and
a weekly schedule that re-audits the latest target of each family.

The watched folder is `$M4I_HOME/watched_models/`; each subfolder holds one checkpoint in a layout a
family of the registry recognizes (`m4i_assets.families.describe_checkpoint`):

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

from dagster import (
    AssetKey,
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

from m4i_assets.data.audits import AuditSpec, load_audits
from m4i_assets.defs.partitions import VERSION_PARTITIONS, version_key
from m4i_assets.defs.resources import Storage
from m4i_assets.families import FAMILIES, WatchedCheckpoint, describe_checkpoint
from m4i_assets.models.checkpoints import sha256_file
from m4i_assets.settings import AuditSettings


def audit_selection(family: str, audit: AuditSpec | None) -> list[str]:
    """The keys (`<family>/<name>`) of what one audited version materializes (`Family.audit_assets`): everything
    of its family for a controlled audit (`audit` None), what its plan allows for an audit of the registry."""
    spec = FAMILIES[family]
    names = spec.audit_assets() if audit is None else spec.audit_assets(audit.planned(), audit.kind == "labelled")
    return [version_key(family, name).to_user_string() for name in names]


audit_jobs = {
    family: define_asset_job(
        f"{family}_audit",
        selection=AssetSelection.assets(*(version_key(family, name) for name in spec.job_assets())),
        partitions_def=VERSION_PARTITIONS[family],
        description=f"The full audit of one {family} model version (its partition).",
        tags={"m4i/stage": "audit"},  # the instance's run queue limits concurrent audits by this tag
    )
    for family, spec in FAMILIES.items()
}
WATCHED = "watched_models"


def register_watched(storage: Storage, audit: str, folder: Path, checkpoint: WatchedCheckpoint, sha: str) -> str:
    """Copy a watched checkpoint folder under `models/<version>/` and register it as a target of `audit`."""
    row = {"family": checkpoint.family, "arch": checkpoint.arch, "role": "target", "audit": audit,
           "train_config": json.dumps({"source": str(folder)})}  # fmt: skip
    weights = checkpoint.weights.relative_to(folder).as_posix()
    return storage.register_model(folder, sha, row, move=False, weights=weights)


def watched_folders(watch: Path, audits: dict[str, AuditSpec]) -> list[tuple[str, AuditSpec | None, Path]]:
    """(cursor key, audit of the registry or None for the settings' audit, folder) of every watched folder:
    `watched_models/<audit name>/<folder>/` for an audit of the registry, `watched_models/<folder>/` else."""
    found = []
    for folder in sorted(p for p in watch.glob("*") if p.is_dir()) if watch.is_dir() else []:
        if folder.name in audits:
            found += [(f"{folder.name}/{sub.name}", audits[folder.name], sub)
                      for sub in sorted(p for p in folder.glob("*") if p.is_dir())]  # fmt: skip
        else:
            found.append((folder.name, None, folder))
    return found


@sensor(
    jobs=list(audit_jobs.values()),
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.STOPPED,
    description="Audits every new or changed checkpoint dropped in $M4I_HOME/watched_models/<name>/ (or, for an "
    "audit of the registry, in watched_models/<audit name>/<name>/).",
)
def watched_models_sensor(context: SensorEvaluationContext, storage: Storage, settings: AuditSettings):
    seen: dict[str, list] = json.loads(context.cursor or "{}")
    audits = {a.name: a for a in load_audits(settings.audit_registry_path(storage.root))}
    runs, versions = [], {family: [] for family in FAMILIES}
    for key, audit, folder in watched_folders(storage.root / WATCHED, audits):
        try:
            checkpoint = describe_checkpoint(folder)
            if audit is not None and checkpoint.family != audit.family:
                raise ValueError(
                    f"a {checkpoint.family} checkpoint in the folder of {audit.family} audit {audit.name!r}"
                )
        except ValueError as exc:  # still being copied, or not a checkpoint: said once per reason
            if seen.get(key) != [str(exc)]:
                context.log.warning(f"skipping {folder}: {exc}")
            seen[key] = [str(exc)]
            continue
        stat = checkpoint.weights.stat()
        previous = seen.get(key)
        if previous and previous[:2] == [stat.st_size, stat.st_mtime_ns]:
            continue  # unchanged since the last tick: not even re-hashed
        sha = sha256_file(checkpoint.weights)
        seen[key] = [stat.st_size, stat.st_mtime_ns, sha]
        if previous and len(previous) == 3 and previous[2] == sha:
            continue  # touched, same bytes
        version = register_watched(storage, audit.name if audit else settings.audit, folder, checkpoint, sha)
        versions[checkpoint.family].append(version)
        selection = [AssetKey.from_user_string(k) for k in audit_selection(checkpoint.family, audit)]
        runs.append(RunRequest(run_key=version, partition_key=version, job_name=audit_jobs[checkpoint.family].name,
                               asset_selection=selection))  # fmt: skip
    return SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[VERSION_PARTITIONS[f].build_add_request(v) for f, v in versions.items() if v],
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
        selection = [
            AssetKey.from_user_string(k) for k in audit_selection(family, settings.registered_audit(storage.root))
        ]
        return [
            RunRequest(run_key=f"{version}@{tick}", partition_key=version, asset_selection=selection)
            for version in storage.repository.latest_versions(settings.audit, "target", family=family)
        ]

    return _schedule


reaudit_schedules = [reaudit_schedule(family) for family in FAMILIES]
