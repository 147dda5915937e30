"""One re-audit through the real Dagster daemon: drop a new CLIP checkpoint in the watched folder of a
home where `make demo` has run, start `watched_models_sensor` and `dagster-daemon run`, and wait for
the audit backfill the sensor submits. Prints what it took and what it added.

    M4I_HOME=.m4i .venv/bin/python bench/reaudit.py [--seed-offset 1000] [--timeout 1800]

The new checkpoint is the audit's target recipe retrained with another seed (a team retraining its
model), trained here before the clock starts. Figures: wall time from the drop to the audit backfill's
success, records embedded for the new version, rows added per table, and whether any earlier version's
rows were recomputed (they must not be).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dagster import DagsterInstance

from m4i_assets import orchestration
from m4i_assets.cli import REPO
from m4i_assets.defs.resources import Storage
from m4i_assets.orchestration import prepare_dagster_home
from m4i_assets.settings import m4i_home, settings_for

TABLES = ("membership_scores", "attack_metrics", "pseudo_labels", "embeddings", "augmentation_deltas")


def counts(storage: Storage) -> dict[str, int]:
    with storage.reader() as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def computed_at(storage: Storage) -> dict[str, str]:
    rows = storage.read("SELECT model_version, attack, computed_at FROM attack_metrics")
    return {f"{r['model_version']}/{r['attack']}": str(r["computed_at"]) for r in rows.to_dicts()}


def train_checkpoint(storage: Storage, seed_offset: int, out: Path) -> None:
    """The audit's target recipe with another seed, on the audit's members, saved as the platform saves."""
    from m4i_assets.models import clip

    settings = settings_for()
    members = storage.repository.audit_records(settings.audit, ("member",))
    spec = settings.clip_train_spec(seed_offset=seed_offset)
    clip.train_and_save(spec, members["image_uri"].to_list(), members["caption"].to_list(), out,
                        {"role": "retrained target", "seed_offset": seed_offset})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed-offset", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    home = m4i_home()
    storage = Storage(home=str(home))
    if not storage.database.exists():
        raise SystemExit(f"no warehouse in {home}: run `make demo` first")
    env = {**os.environ, "M4I_HOME": str(home), "DAGSTER_HOME": str(prepare_dagster_home(home))}

    staging = Path(tempfile.mkdtemp(prefix="m4i-retrained-"))
    start = time.monotonic()
    train_checkpoint(storage, args.seed_offset, staging)
    print(f"trained the new checkpoint in {time.monotonic() - start:.0f}s (not part of the re-audit)", flush=True)

    before, stamps = counts(storage), computed_at(storage)
    dagster = [sys.executable, "-m", "dagster"]
    subprocess.run([*dagster, "sensor", "start", "watched_models_sensor", "-w", "workspace.yaml"], cwd=REPO, env=env,
                   check=True, capture_output=True)  # fmt: skip
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    instance = DagsterInstance.get()
    known = {b.backfill_id for b in instance.get_backfills()}
    try:
        with orchestration.daemon(instance, env, home / "logs" / "reaudit_daemon.log"):
            drop = home / "watched_models" / f"retrained-seed{args.seed_offset}"
            shutil.rmtree(drop, ignore_errors=True)
            start = time.monotonic()
            shutil.copytree(staging, drop)
            version, status = wait_for_audit(instance, known, args.timeout)
            wall = time.monotonic() - start
    finally:
        subprocess.run([*dagster, "sensor", "stop", "watched_models_sensor", "-w", "workspace.yaml"], cwd=REPO,
                       env=env, capture_output=True)  # fmt: skip
    after = counts(storage)
    changed = [k for k, v in stamps.items() if computed_at(storage).get(k) != v]
    embedded = storage.read("SELECT count(*) AS n FROM embeddings WHERE model_version = ?", [version])["n"][0]
    print(json.dumps({
        "model_version": version, "run_status": status, "wall_s_drop_to_audited": round(wall, 1),
        "records_embedded": int(embedded), "rows_added": {t: after[t] - before[t] for t in TABLES},
        "earlier_attack_metrics_rows_recomputed": len(changed),
    }, indent=2))  # fmt: skip


def wait_for_audit(instance: DagsterInstance, known: set[str], timeout: float) -> tuple[str, str]:
    """Wait for the sensor's backfill of the dropped checkpoint, then follow it to its end; (model version, its
    final status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [b for b in instance.get_backfills() if b.backfill_id not in known and b.tags.get("m4i/version")]
        if fresh:
            return fresh[0].tags["m4i/version"], orchestration.follow(instance, fresh[0].backfill_id).value
        time.sleep(5)
    raise SystemExit(f"no audit backfill within {timeout:.0f}s; see logs/reaudit_daemon.log")


if __name__ == "__main__":
    main()
