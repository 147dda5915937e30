"""Shared fixtures' helpers: the end-to-end tests run `m4i demo` on the tiny profile in a fresh home."""

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

REPO = Path(__file__).resolve().parents[1]
CLIP_ATTACKS = {"csa", "aea", "clip_loss", "rmia", "wsa", "ref_calibrated", "blind_baseline"}


def run_demo(home: Path, *args: str, settings: dict | None = None) -> str:
    """`m4i demo [args]` on the tiny profile (with `settings` on top) with `home` as $M4I_HOME; its stdout (fails
    with the log tail)."""
    env = {**os.environ, "M4I_HOME": str(home), "M4I_PROFILE": "tiny", "M4I_SETTINGS": json.dumps(settings or {})}
    out = subprocess.run([sys.executable, "-m", "m4i_assets.cli", "demo", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """A tiny `m4i demo` (the CLIP audit) in a fresh home: (home, stdout). A read-only session is held open on the
    warehouse all through the demo, as a SQL user's `duckdb -readonly` would be: the demo must not fail, and the
    session sees its rows. test_end_to_end.py checks it table by table, test_distributed.py reruns its audit."""
    from m4i_assets.defs.resources import Storage

    home = tmp_path_factory.mktemp("m4i_home")
    Storage(home=str(home)).warehouse.publish_catalog()
    session = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        assert session.execute("SELECT count(*) FROM membership_scores").fetchone() == (0,)
        stdout = run_demo(home)
        attacks = session.execute("SELECT count(DISTINCT attack) FROM membership_scores").fetchone()
        assert attacks == (len(CLIP_ATTACKS),)
    finally:
        session.close()
    return home, stdout


RUN_COLUMNS = {"computed_at", "mlflow_run_id"}  # columns that name a run rather than its results


def snapshot(home: Path, version: str, tables: tuple[str, ...]) -> dict:
    """What an audit wrote for `version` in these tables and signals, without the columns that name a run, in a
    stable row order."""
    import polars as pl

    from m4i_assets.defs.resources import Storage

    storage = Storage(home=str(home))
    frames = {}
    for table in tables:
        frame = storage.read(f"SELECT * FROM {table} WHERE model_version = ?", [version])
        frame = frame.drop([c for c in frame.columns if c in RUN_COLUMNS])
        frames[table] = frame.sort([c for c in frame.columns if frame[c].dtype == pl.String])
    return frames


def read_only(home: Path):
    """A read-only connection to a demo home's warehouse, closed after the test."""
    conn = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    yield conn
    conn.close()


def ingest(resources: dict, instance) -> list:
    """Materialize every source shard, one run per partition as a backfill would, then `records` and
    `record_roles`; returns the assets built for `resources`."""
    from dagster import materialize

    from m4i_assets.data.sources import shard_partition_keys
    from m4i_assets.defs.assets.data import audit_sources
    from m4i_assets.defs.definitions import build_assets

    assets = build_assets(resources)
    for key in shard_partition_keys(audit_sources(resources["settings"], resources["storage"])):
        shard = materialize(assets, resources=resources, instance=instance, selection=["source_shards"],
                            partition_key=key)  # fmt: skip
        assert shard.success, key
    assert materialize(assets, resources=resources, instance=instance, selection=["records", "record_roles"]).success
    return assets


def materialize_audit(assets: list, family: str, audit, version: str, resources: dict, instance) -> None:
    """One version's audit in process, run by run as its backfills would (`automation.audit_runs`): its checkpoint,
    each record shard's signals, then the rest."""
    from dagster import materialize

    from m4i_assets.defs.automation import audit_runs

    for _, keys, partition in audit_runs(family, audit, version, resources["settings"].record_shards):
        result = materialize(assets, resources=resources, instance=instance, selection=keys, partition_key=partition)
        assert result.success, (keys, partition)


def defend_in_process(home: Path, family: str, defenses: dict[str, list[float]]):
    """On a tiny demo home: register / train the family's defended versions, run each one's audit job in
    process, then `defense_evaluations`; returns (defended versions, the evaluation's materialize result)."""
    from dagster import DagsterInstance, materialize

    from m4i_assets.defs.definitions import build_assets, build_resources
    from m4i_assets.families import FAMILIES
    from m4i_assets.settings import PROFILES, AuditSettings

    settings = AuditSettings(**{**PROFILES["tiny"], f"{family}_defenses": defenses})
    resources = build_resources(home=home, settings=settings)
    assets = build_assets(resources)
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    try:
        instance = DagsterInstance.get()
        kwargs = {"resources": resources, "instance": instance}
        assert materialize(assets, selection=[f"defended_{family}s"], **kwargs).success
        storage = resources["storage"]
        helpers = FAMILIES[family]  # the helpers trained with a defense, for its adaptive attacker
        assert storage.read("SELECT count(*) AS n FROM models WHERE role = ?", [helpers.defended_helper_role])["n"][0]
        assert materialize(assets, selection=[helpers.helper_asset], **kwargs).success
        versions = storage.read("SELECT model_version FROM models WHERE role = 'defended' ORDER BY 1")
        for version in versions["model_version"]:
            materialize_audit(assets, family, None, version, **kwargs)
        evaluation = materialize(assets, selection=["defense_evaluations"], **kwargs)
        assert evaluation.success
        return versions["model_version"].to_list(), evaluation
    finally:
        del os.environ["DAGSTER_HOME"]
