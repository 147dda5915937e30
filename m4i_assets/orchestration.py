"""Orchestration by Dagster: each phase of `m4i demo` and `m4i audit` is a backfill of asset partitions, which
the daemon runs through the instance's run queue (at most `MAX_CONCURRENT_RUNS` runs at once, launched in
lineage order, each run's process watched by run monitoring); the CLI submits it and follows it to its end.
A running daemon of the instance is used as it is; otherwise the CLI starts one for the audit's duration.

The daemon looks at its backfills every 30 s and launches a run for the partitions whose parents are
materialized by then, so a backfill spanning several steps of lineage across partitionings (a version's signal
shards, then its attacks) runs in waves, each waiting for the next look, each wave's runs paying their start.
A phase is therefore one backfill per partitioning, each of one wave (its partitions' parents materialized
before it is submitted): one run per partition. The daemon the CLI starts (`python -m m4i_assets.orchestration
run`) looks every `BACKFILL_LOOK_S` seconds; a daemon of the deployment (`dagster-daemon run`) keeps Dagster's
30 s, which the interval is not configurable for.

A backfill carries the audit's settings in its run config (`resources.settings`), so its runs compute what
the CLI was asked for, whichever daemon launches them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.execution.backfill import BULK_ACTION_TERMINAL_STATUSES, BulkActionStatus, PartitionBackfill
from dagster._core.utils import make_new_backfill_id

from m4i_assets.settings import AuditSettings

REPO = Path(__file__).resolve().parents[1]
MAX_CONCURRENT_RUNS = 2  # a developer machine's two cores
HEARTBEAT_S = 60.0  # a daemon whose backfill loop beat within this is running
BACKFILL_LOOK_S = 1  # how often the daemon the CLI starts looks at its backfills (Dagster's own: every 30 s)

# The instance of an `$M4I_HOME` (written by `m4i home`, or upgraded from the first release's, which had no queue).
DAGSTER_YAML = f"""\
# Dagster instance of the M4I platform (written by `m4i home`; edit freely, it is not overwritten).
telemetry:
  enabled: false
# Runs wait in the daemon's queue: at most {MAX_CONCURRENT_RUNS} at once, whatever launched them (the CLI's
# backfills, the UI, sensors).
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: {MAX_CONCURRENT_RUNS}
    dequeue_interval_seconds: 1
# A run whose process died ends FAILED (not STARTED forever) and is retried once.
run_monitoring:
  enabled: true
  start_timeout_seconds: 300
  poll_interval_seconds: 10
run_retries:
  enabled: true
  max_retries: 1
  retry_on_asset_or_op_failure: false
# No asset has an automation condition: the daemon need not look for any.
auto_materialize:
  enabled: false
  use_sensors: false
"""
FIRST_DAGSTER_YAML = """\
# Dagster instance of the M4I platform (written by `m4i home`; edit freely, it is not overwritten).
telemetry:
  enabled: false
"""


def prepare_dagster_home(home: Path) -> Path:
    """Create `$M4I_HOME/dagster` with a dagster.yaml and its storage; runs and event logs persist there.

    The storage (SQLite run, event-log and schedule databases) is created here, once: runs launched in
    parallel on a fresh home would otherwise race to create the same tables ("table ... already exists")."""
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists() or config.read_text() == FIRST_DAGSTER_YAML:
        config.write_text(DAGSTER_YAML)
    instance = DagsterInstance.from_config(str(dagster_home))
    instance.get_runs(limit=1)
    instance.dispose()
    return dagster_home


def partitions_subset(asset_graph, partitions: Iterable[tuple[str, str | None]]) -> AssetGraphSubset:
    """(asset key, partition key or None) pairs as the subset of the asset graph a backfill targets."""
    pairs = {AssetKeyPartitionKey(AssetKey.from_user_string(key), partition) for key, partition in partitions}
    return AssetGraphSubset.from_asset_partition_set(pairs, asset_graph)


def execution_config(in_process: bool) -> dict | None:
    """The executor config of a backfill's runs: under the default executor, each run's steps one after the
    other in its process (`in_process`: a partition's run, where a process per step would cost seconds each),
    else in parallel processes; None under Celery (`M4I_EXECUTOR`), whose config is its own."""
    if os.environ.get("M4I_EXECUTOR", "multiprocess") != "multiprocess":
        return None
    return {"in_process": {}} if in_process else {"multiprocess": {"max_concurrent": MAX_CONCURRENT_RUNS}}


def submit(
    instance: DagsterInstance,
    subset: AssetGraphSubset,
    title: str,
    settings: AuditSettings | None = None,
    execution: dict | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Submit a backfill of `subset` to the instance's daemon; returns its id. `settings` and the executor's
    config (`execution_config`) go in every run's config, `tags` on every run (the queue's limits read them)."""
    run_config: dict = {}
    if settings is not None:
        run_config["resources"] = {"settings": {"config": settings.model_dump()}}
    if execution is not None:
        run_config["execution"] = {"config": execution}
    backfill_id = make_new_backfill_id()
    instance.add_backfill(PartitionBackfill.from_asset_graph_subset(
        backfill_id=backfill_id, backfill_timestamp=time.time(), tags={"m4i/backfill": title, **(tags or {})},
        dynamic_partitions_store=instance, asset_graph_subset=subset, title=title, description=None,
        run_config=run_config or None,
    ))  # fmt: skip
    return backfill_id


ENDED = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)


def run_label(run) -> str:
    return run.tags.get("dagster/partition") or ",".join(sorted(k.to_user_string() for k in run.asset_selection or []))


def failure_text(instance: DagsterInstance, run_id: str) -> str:
    """The errors of a failed run's steps (or of the run itself)."""
    lines = []
    for event in instance.all_logs(run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}):
        data = event.dagster_event.event_specific_data
        error = getattr(data, "error", None)
        lines.append(f"  {event.dagster_event.step_key or 'run'}: "
                     f"{error.to_string() if error is not None else event.message}")  # fmt: skip
    return "\n".join(lines) or "  (no step failure recorded: see the run in the Dagster UI)"


def follow(instance: DagsterInstance, backfill_id: str, log=print, poll_s: float = 1.0) -> BulkActionStatus:
    """Wait for a backfill to end, saying each of its runs' end (and a failed run's errors); returns its status.

    A backfill that has requested all its partitions and whose runs all succeeded is done: the daemon would
    say so at its next look, up to 30 s later. Any other end is the daemon's (a failed run may be retried)."""
    seen: set[str] = set()
    while True:
        backfill = instance.get_backfill(backfill_id)
        runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))
        for run in sorted(runs, key=lambda r: r.run_id):
            if run.run_id not in seen and run.status in ENDED:
                seen.add(run.run_id)
                record = instance.get_run_record_by_id(run.run_id)
                took = (record.end_time or 0) - (record.start_time or record.end_time or 0)
                log(f"  run {run.run_id[:8]} {run_label(run)}: {run.status.value} in {took:.0f}s")
                if run.status == DagsterRunStatus.FAILURE:
                    log(failure_text(instance, run.run_id))
        if backfill.status in BULK_ACTION_TERMINAL_STATUSES:
            return backfill.status
        data = backfill.asset_backfill_data
        if (data is not None and runs and data.requested_subset == data.target_subset
                and all(r.status == DagsterRunStatus.SUCCESS for r in runs)):  # fmt: skip
            return BulkActionStatus.COMPLETED_SUCCESS
        time.sleep(poll_s)


def daemon_running(instance: DagsterInstance) -> bool:
    """Whether a daemon of this instance runs backfills now (its heartbeat is recent)."""
    beat = instance.get_daemon_heartbeats().get("BACKFILL")
    return beat is not None and time.time() - beat.timestamp < HEARTBEAT_S


@contextmanager
def daemon(instance: DagsterInstance, env: dict[str, str], log_file: Path) -> Iterator[bool]:
    """The instance's daemon: the running one, or one on the repository's workspace started here (`run_daemon`,
    with `env`: the audit's home, profile and settings) and stopped on exit. Yields whether it started one."""
    if daemon_running(instance):
        yield False
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "m4i_assets.orchestration", "run", "-w", str(REPO / "workspace.yaml")]
    with open(log_file, "a") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not daemon_running(instance):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "".join(log_file.read_text().splitlines(True)[-30:])
                raise RuntimeError(f"dagster-daemon did not start (exit code {proc.poll()}); {log_file}:\n{tail}")
            time.sleep(1)
        yield True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        instance.wipe_daemon_heartbeats()  # its last beats would pass for a running daemon for a minute


def run_daemon(argv: list[str]) -> int:
    """`dagster-daemon <argv>` whose backfill loop looks every BACKFILL_LOOK_S seconds: Dagster reads its loop's
    interval, `dagster._daemon.controller.DEFAULT_DAEMON_INTERVAL_SECONDS` (30), when each loop starts, and offers
    no setting for it. Were that name gone, this is Dagster's daemon as it is, looking every 30 s."""
    from dagster._daemon import controller
    from dagster._daemon.cli import main

    controller.DEFAULT_DAEMON_INTERVAL_SECONDS = BACKFILL_LOOK_S
    sys.argv = ["dagster-daemon", *argv]
    return main()


if __name__ == "__main__":
    sys.exit(run_daemon(sys.argv[1:]))
