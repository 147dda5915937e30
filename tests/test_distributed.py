"""The platform beyond one machine, on loopback: the Dagster instance on Postgres (deploy/dagster.yaml), a Redis
broker, two `dagster-celery worker` processes and the daemon's run queue. The tiny demo's target audit runs again
through the Celery executor in a copy of the demo's lake; every table and signal of that version must equal the
in-process run's, row for row, after one worker process is killed in the middle of the blind baseline step (the step,
put back on the queue, completes) and then the run worker itself is killed (the run ends FAILED, not STARTED
forever, and the daemon's run retries finish it from its failure).

Needs redis-server and PostgreSQL's server binaries (Debian's redis-server and postgresql; `make test` installs
them when missing). As root, Postgres runs as the `postgres` user."""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from conftest import snapshot
from polars.testing import assert_frame_equal

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What one version's audit writes.
TABLES = ("membership_scores", "pseudo_labels", "attack_metrics", "model_utility", "embeddings", "augmentation_deltas")
KILLED_STEP = "clip__blind_baseline_scores"  # the longest tiny step (7 s; embeddings take under 2 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, ready, timeout: float = 120, proc: subprocess.Popen | None = None, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if value := ready():
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")


@contextmanager
def process(
    cmd: list[str], log: Path, env: dict | None = None, stop: int = signal.SIGTERM
) -> Iterator[subprocess.Popen]:
    """A service in its own process group, stopped (`stop`, then SIGKILL) with everything it started."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        yield proc
    finally:
        for sig, grace in ((stop, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def stop_leftovers(marker: str) -> None:
    """Kill the processes that carry `marker` (`NAME=value`) in their environment: what a service started in a
    session of its own (the daemon's code server, a run worker) and left when the test failed mid-run."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            found = marker.encode() in (proc / "environ").read_bytes().split(b"\0")
            if found:
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:  # gone, or not ours to read
            continue


@contextmanager
def postgres(stack: ExitStack, logs: Path) -> Iterator[int]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a `dagster` database; its port."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    assert bins, "PostgreSQL's server is not installed (apt-get install postgresql; `make test` does it)"
    bindir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="m4i-pg-"))
    as_pg = []
    if os.geteuid() == 0:  # initdb refuses root
        shutil.chown(root, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    try:
        subprocess.run([*as_pg, bindir / "initdb", "-D", root / "db", "-U", "m4i", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True)  # fmt: skip
        port = free_port()
        cmd = [*as_pg, str(bindir / "postgres"), "-D", str(root / "db"), "-h", "127.0.0.1", "-p", str(port),
               "-k", str(root)]  # fmt: skip
        server = stack.enter_context(process(cmd, logs / "postgres.log", stop=signal.SIGINT))  # fast shutdown
        ready = [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "m4i"]
        wait_for("postgres", lambda: subprocess.run(ready, capture_output=True).returncode == 0, proc=server)
        subprocess.run([bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "m4i", "dagster"], check=True)
        yield port
    finally:
        stack.callback(shutil.rmtree, root, ignore_errors=True)


def active_step_tasks(app) -> list[tuple[str, int, list[str]]]:
    """(worker, pool process id, step keys) of each step a Celery worker is executing now."""
    found = []
    for worker, tasks in (app.control.inspect(timeout=1.0).active() or {}).items():
        for task in tasks:
            packed = (task.get("kwargs") or {}).get("execute_step_args_packed") or (task.get("args") or [{}])[0]
            found.append((worker, task["worker_pid"], list(packed.get("step_keys_to_execute") or [])))
    return found


@pytest.mark.timeout(1200)
def test_the_audit_on_celery_workers_equals_the_in_process_run(demo_home, tmp_path):
    from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
    from dagster._core.execution.backfill import BULK_ACTION_TERMINAL_STATUSES, BulkActionStatus
    from dagster_celery.make_app import make_app

    from m4i_assets import orchestration
    from m4i_assets.defs.automation import AUDIT_TAGS, audit_runs
    from m4i_assets.defs.definitions import build_definitions
    from m4i_assets.defs.resources import Storage
    from m4i_assets.settings import settings_for

    demo, _ = demo_home
    storage = Storage(home=str(demo))
    trained = "SELECT model_version FROM models WHERE role = 'target' AND train_fingerprint IS NOT NULL"
    [target] = storage.read(trained)["model_version"].to_list()  # the demo's (not a checkpoint dropped by a test)
    expected = snapshot(demo, target, TABLES)
    assert expected["membership_scores"].height > 0
    # The in-process runs of that audit in the demo (its signals' shard, then the rest), for their wall time.
    os.environ["DAGSTER_HOME"] = str(demo / "dagster")
    try:
        with DagsterInstance.get() as instance:
            records = [r for r in instance.get_run_records()
                       if r.dagster_run.tags.get("dagster/partition") in (target, f"0|{target}")]  # fmt: skip
            assert len(records) == 2
            in_process_s = sum(r.end_time - r.start_time for r in records)
    finally:
        del os.environ["DAGSTER_HOME"]

    # A second home on the same models and records: the lake and signals copied, the checkpoints shared.
    home = tmp_path / "cluster_home"
    for folder in ("lake", "signals"):
        shutil.copytree(demo / folder, home / folder)
    (home / "dagster").mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster" / "dagster.yaml")
    logs = tmp_path / "logs"
    logs.mkdir()

    with ExitStack() as stack:
        stack.callback(stop_leftovers, f"DAGSTER_HOME={home / 'dagster'}")  # last, after each service's own stop
        pg_port = stack.enter_context(postgres(stack, logs))
        redis_port = free_port()
        redis = stack.enter_context(process(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            logs / "redis.log"))  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
               "M4I_HOME": str(home), "M4I_PROFILE": "tiny", "DAGSTER_HOME": str(home / "dagster"),
               "M4I_EXECUTOR": "celery", "M4I_PG_HOST": "127.0.0.1", "M4I_PG_PORT": str(pg_port), "M4I_PG_USER": "m4i",
               "M4I_PG_PASSWORD": "m4i", "M4I_PG_DB": "dagster",
               "M4I_CELERY_BROKER": f"redis://127.0.0.1:{redis_port}/0",
               "M4I_CELERY_BACKEND": f"redis://127.0.0.1:{redis_port}/1"}  # fmt: skip
        app = make_app({"broker": env["M4I_CELERY_BROKER"], "backend": env["M4I_CELERY_BACKEND"]})
        wait_for("redis", lambda: app.control.ping(timeout=0.2) is not None, proc=redis)
        subprocess.run([BIN / "dagster", "instance", "migrate"], env=env, check=True, capture_output=True)
        # One pool process each, on both queues (this machine has no GPU). One -q with a list: Celery keeps only
        # the last of several.
        for name in ("w1", "w2"):
            stack.enter_context(process(
                [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                 "-y", str(REPO / "deploy" / "celery.yaml"), "-n", name, "-q", "dagster,gpu",
                 "--", "--concurrency", "1", "--loglevel", "INFO"],
                logs / f"worker_{name}.log", env))  # fmt: skip
        wait_for("two workers", lambda: len(app.control.ping(timeout=1.0) or []) == 2, timeout=180)
        daemon = stack.enter_context(
            process(
                [sys.executable, "-m", "m4i_assets.orchestration", "run", "-w", str(REPO / "workspace.yaml")],
                logs / "daemon.log",
                env,
            )
        )
        os.environ.update({k: v for k, v in env.items() if k.startswith("M4I_PG_")})
        os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
        stack.callback(lambda: [os.environ.pop(k, None) for k in ("DAGSTER_HOME", *(k for k in env if "_PG_" in k))])
        instance = stack.enter_context(DagsterInstance.get())
        instance.add_dynamic_partitions("clip_versions", [target])

        # The target's audit as `m4i demo` submits it, through the daemon: a backfill of its signals' shard, then
        # one of the rest, each run queued as an audit (the tag the queue limits).
        graph = build_definitions(home=home, settings=settings_for("tiny")).resolve_asset_graph()
        stages = audit_runs("clip", None, target, shards=1)

        def submit(stage: str) -> str:
            partitions = [(key, p) for name, keys, p in stages if name == stage for key in keys]
            subset = orchestration.partitions_subset(graph, partitions)
            return orchestration.submit(instance, subset, f"distributed audit: {stage}", tags=AUDIT_TAGS)

        assert orchestration.follow(instance, submit("signals")) == BulkActionStatus.COMPLETED_SUCCESS
        [signals_run] = instance.get_runs(RunsFilter(tags={"dagster/partition": f"0|{target}"}))
        backfill = submit("audit")
        run = wait_for(
            "the audit run",
            lambda: next(
                iter(instance.get_runs(RunsFilter(tags={"dagster/partition": target, "dagster/backfill": backfill}))),
                None,
            ),
            timeout=300,
            proc=daemon,
        )

        # Kill the pool process of whichever worker executes the killed step, mid-step: as soon as the step has
        # started (its STEP_START is logged after the task's imports, so a fixed sleep after the task appears can
        # land after the step has already finished on a quiet machine).
        def embedding_task():
            return next(((w, pid) for w, pid, steps in active_step_tasks(app) if KILLED_STEP in steps), None)

        def step_started():
            return any(e.step_key == KILLED_STEP
                       for e in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START))  # fmt: skip

        worker, pid = wait_for(f"{KILLED_STEP} on a worker", embedding_task, timeout=600, proc=daemon)
        wait_for(f"{KILLED_STEP} started", step_started, timeout=300, proc=daemon, poll=0.05)
        os.kill(pid, signal.SIGKILL)

        def events(of_type, run_id=run.run_id):
            return instance.all_logs(run_id, of_type=of_type)

        # Then kill the run worker (the process the daemon's code server started for the run; its pid is on the
        # run's RUN_START event) as soon as a step after embeddings has started.
        wait_for(f"{KILLED_STEP} retried", lambda: any(e.step_key == KILLED_STEP
                                                        for e in events(DagsterEventType.STEP_SUCCESS)),
                 timeout=600, proc=daemon)  # fmt: skip
        wait_for("a later step", lambda: {e.step_key for e in events(DagsterEventType.STEP_START)} - {KILLED_STEP},
                 timeout=300, proc=daemon, poll=0.05)  # fmt: skip
        [run_worker] = {e.dagster_event.pid for e in events(DagsterEventType.RUN_START)}
        os.kill(run_worker, signal.SIGKILL)

        def finished(run_id):
            status = instance.get_run_by_id(run_id).status
            return status if status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE) else None

        killed_status = wait_for("the killed run's end", lambda: finished(run.run_id), timeout=300, proc=daemon)
        retried = wait_for("the retry", lambda: next(iter(instance.get_runs(RunsFilter(
            tags={"dagster/parent_run_id": run.run_id}))), None), timeout=300, proc=daemon)  # fmt: skip
        status = wait_for("the retried run", lambda: finished(retried.run_id), timeout=900, proc=daemon)
        backfill_status = wait_for("the backfill's end", lambda: (lambda b: b.status if b.status in
                                   BULK_ACTION_TERMINAL_STATUSES else None)(instance.get_backfill(backfill)),
                                   timeout=120, proc=daemon)  # fmt: skip
        record = instance.get_run_record_by_id(signals_run.run_id)
        retried_record = instance.get_run_record_by_id(retried.run_id)
        starts = [e for e in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)
                  if e.step_key == KILLED_STEP]  # fmt: skip
        successes = [e for e in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_SUCCESS)
                     if e.step_key == KILLED_STEP]  # fmt: skip
        queued = {instance.get_run_by_id(r.run_id).tags.get("m4i/stage") for r in (signals_run, run, retried)}
        celery_s = retried_record.end_time - record.start_time
        print(f"\nclip audit of {target}: in process {in_process_s:.0f}s, on 2 Celery workers {celery_s:.0f}s "
              f"(one killed in {KILLED_STEP} on {worker}; then the run worker, the run retried)")  # fmt: skip

    assert killed_status == DagsterRunStatus.FAILURE  # not STARTED forever
    assert status == DagsterRunStatus.SUCCESS, (logs / "daemon.log").read_text()[-3000:]
    assert queued == {"audit"}  # through the queue's tag limit
    assert backfill_status == BulkActionStatus.COMPLETED_SUCCESS  # the retried run completed the backfill
    assert len(starts) == 2 and len(successes) == 1  # the killed step ran again, and completed
    actual = snapshot(home, target, TABLES)
    for table in TABLES:
        assert_frame_equal(actual[table], expected[table], check_exact=False), table
