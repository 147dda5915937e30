"""Shared fixtures' helpers: the end-to-end tests run `m4i demo` on the tiny profile in a fresh home."""

import os
import subprocess
import sys
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parents[1]


def run_demo(home: Path, *args: str) -> str:
    """`m4i demo [args]` on the tiny profile with `home` as $M4I_HOME; its stdout (fails with the log tail)."""
    env = {**os.environ, "M4I_HOME": str(home), "M4I_PROFILE": "tiny"}
    out = subprocess.run([sys.executable, "-m", "m4i_assets.cli", "demo", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


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
