"""Re-audits: per model family, a job of the sharded signals and one of the rest of a version's audit, a sensor
on the watched models folder, and a weekly re-audit of the latest target of each family. Both request one
backfill per audited version (its signals shard by shard, then its attacks and metrics), which the daemon
runs through its queue in lineage order: a schedule cannot ask for a backfill, so the weekly re-audit is a
sensor that fires once per week, at its cron time.

The watched folder is `$M4I_HOME/watched_models/`; each subfolder holds one checkpoint in a layout a
family of the registry recognizes (`m4i_assets.families.describe_checkpoint`, whose `SUPPORTED` lists them):
an open_clip weights file beside a `model.json` naming its arch, an open_clip hub folder, a Hugging Face dual
encoder (CLIP, SigLIP, ...), this platform's captioner or a Hugging Face image-to-text model (VisionEncoderDecoder,
BLIP, GIT, ...).

A new or changed checkpoint is copied under `models/`, registered as a `target` of the audit (its
`checkpoint_uri` the weights file, whose sha256 names the model version), added as a model-version
partition and audited; the cursor remembers each folder's weights file size, mtime and sha256, so an
unchanged folder launches nothing. A folder that is not a checkpoint is logged once per reason.
"""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    sensor,
)
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset

from m4i_assets.data.audits import AuditSpec, load_audits
from m4i_assets.data.shards import Shard
from m4i_assets.defs.partitions import VERSION_PARTITIONS, shard_partition_key, version_key
from m4i_assets.defs.resources import Storage
from m4i_assets.families import FAMILIES, WatchedCheckpoint, describe_checkpoint
from m4i_assets.models.checkpoints import sha256_file
from m4i_assets.orchestration import partitions_subset
from m4i_assets.settings import AuditSettings


def audit_selection(family: str, audit: AuditSpec | None) -> list[str]:
    """The keys (`<family>/<name>`) of what one audited version materializes (`Family.audit_assets`): everything
    of its family for a controlled audit (`audit` None), what its plan allows for an audit of the registry."""
    spec = FAMILIES[family]
    names = spec.audit_assets() if audit is None else spec.audit_assets(audit.planned(), audit.kind == "labelled")
    return [version_key(family, name).to_user_string() for name in names]


# On every run of an audit (its jobs' runs, the backfills' of the sensors and the CLI): the instance's run queue
# limits concurrent audits by this tag.
AUDIT_TAGS = {"m4i/stage": "audit"}


STAGES = ("signals", "audit")


def audit_runs(family: str, audit: AuditSpec | None, version: str, shards: int) -> list[tuple[str, list[str], str]]:
    """(stage, asset keys, partition key) of each run of one version's audit, in lineage order (`STAGES`): its
    model-forward signals per record shard (`shard|version`), then every other asset of `audit_selection` (the
    version)."""
    keys = audit_selection(family, audit)
    sharded = {version_key(family, name).to_user_string() for name in FAMILIES[family].sharded}
    signals = [k for k in keys if k in sharded]
    runs = [("signals", signals, shard_partition_key(version, Shard(i, shards))) for i in range(shards * bool(signals))]
    return [*runs, ("audit", [k for k in keys if k not in sharded], version)]


def audit_backfill(asset_graph, family: str, audit: AuditSpec | None, version: str, shards: int) -> AssetGraphSubset:
    """The asset partitions of one version's audit (`audit_runs`), as the subset a backfill targets."""
    runs = audit_runs(family, audit, version, shards)
    return partitions_subset(asset_graph, [(key, partition) for _, keys, partition in runs for key in keys])


def audit_request(context: SensorEvaluationContext, family: str, audit: AuditSpec | None, version: str,
                  settings: AuditSettings, reason: str) -> RunRequest:  # fmt: skip
    """A backfill of one version's audit, tagged with what asked for it."""
    subset = audit_backfill(context.repository_def.asset_graph, family, audit, version, settings.record_shards)
    return RunRequest.for_asset_graph_subset(subset, tags={**AUDIT_TAGS, "m4i/version": version, "m4i/reason": reason})


# Per family: the audit of a version from its signals, and its signals per record shard (a backfill runs both).
audit_jobs = [
    job
    for family, spec in FAMILIES.items()
    for job in (
        define_asset_job(
            f"{family}_audit",
            selection=AssetSelection.assets(
                *(version_key(family, name) for name in spec.job_assets() if name not in spec.sharded)
            ),
            partitions_def=VERSION_PARTITIONS[family],
            description=f"The audit of one {family} model version (its partition) from its signals, which "
            f"`{family}_signals` computes shard by shard (a backfill of the version runs both in order).",
            tags=AUDIT_TAGS,
        ),
        define_asset_job(
            f"{family}_signals",
            selection=AssetSelection.assets(*(version_key(family, name) for name in spec.sharded)),
            description=f"The model-forward signals of one {family} model version's record shard (partition "
            "`shard|version`).",
            tags={"m4i/stage": "signals"},
        ),
    )
]
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
        runs.append((checkpoint.family, audit, version))
    return SensorResult(
        run_requests=[audit_request(context, f, a, v, settings, "new checkpoint") for f, a, v in runs],
        dynamic_partitions_requests=[VERSION_PARTITIONS[f].build_add_request(v) for f, v in versions.items() if v],
        cursor=json.dumps(seen, sort_keys=True),
    )


REAUDIT_CRON = "0 3 * * 1"  # Mondays 03:00 UTC


def last_reaudit_time(now: datetime) -> datetime:
    """The latest Monday 03:00 UTC at or before `now` (REAUDIT_CRON)."""
    monday = (now - timedelta(days=now.weekday())).replace(hour=3, minute=0, second=0, microsecond=0)
    return monday if monday <= now else monday - timedelta(days=7)


def reaudit_sensor(family: str):
    """The weekly re-audit (REAUDIT_CRON) of the latest target of one family in the settings' audit: on its first
    tick it notes the latest cron time, then fires once for each later one (missed ticks are not caught up)."""

    @sensor(
        name=f"weekly_{family}_reaudit",
        minimum_interval_seconds=600,
        default_status=DefaultSensorStatus.STOPPED,
        description=f"Re-audits the latest {family} target every week ({REAUDIT_CRON}, UTC), as one backfill.",
    )
    def _sensor(context: SensorEvaluationContext, storage: Storage, settings: AuditSettings):
        due = last_reaudit_time(datetime.now(UTC)).isoformat()
        if context.cursor is None or context.cursor >= due:
            context.update_cursor(due)
            return SkipReason(f"next re-audit after {due} ({REAUDIT_CRON})")
        context.update_cursor(due)
        audit = settings.registered_audit(storage.root)
        return [audit_request(context, family, audit, version, settings, f"weekly re-audit {due}")
                for version in storage.repository.latest_versions(settings.audit, "target", family=family)]  # fmt: skip

    return _sensor


reaudit_sensors = [reaudit_sensor(family) for family in FAMILIES]
