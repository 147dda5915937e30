"""The example queries of `sql/queries/` on a generated warehouse of 10 million `membership_scores` rows.

    PYTHONPATH=$PWD .venv/bin/python bench/sql.py [--rows 10000000] [--versions 20]

Builds a lake in a temporary folder (the platform's layout: one Parquet file per (model version, attack)
partition, `warehouse.duckdb` the views over them): `--versions` model versions (one target per ten, the
rest references), each with the 5 CLIP attacks' scores of the same candidates, their records, models and
attack metrics. Then runs every query file on a read-only connection, as a SQL user would, and prints one
line each: `<query> on <rows> rows: <seconds> s` (the best of three runs after one warm-up)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from m4i_assets.defs.resources import SIGNALS  # noqa: E402
from m4i_assets.storage.warehouse import Warehouse, partition_file, sql_file  # noqa: E402

ATTACKS = ("csa", "aea", "wsa", "ref_calibrated", "blind_baseline")


def build(home: Path, rows: int, versions: int) -> Warehouse:
    """A lake of `rows` scores: `versions` x the attacks x (rows / (versions x attacks)) candidates."""
    wh = Warehouse(home, SIGNALS)
    wh.ensure_lake()
    candidates = rows // (versions * len(ATTACKS))
    conn = duckdb.connect()
    lake = wh.lake
    conn.execute(f"""COPY (SELECT printf('%016x', i) AS record_id, 'bench' AS dataset, 'file:///img/' || i || '.png'
                          AS image_uri, 'a caption of record ' || i AS caption, 64 AS width, 64 AS height,
                          NULL::VARCHAR AS split, NULL::VARCHAR AS metadata, 'bench:' || i AS source_locator,
                          now()::TIMESTAMP AS ingested_at FROM range({candidates}) t(i))
                     TO '{lake / "records" / partition_file({"dataset": "bench"})}' (FORMAT parquet)""")
    for v in range(versions):
        version = f"clip-{v:012x}"
        role = "target" if v % 10 == 0 else "reference"
        conn.execute(f"""COPY (SELECT '{version}' AS model_version, 'clip' AS family, 'm4i-tiny-vit' AS arch,
                              '{role}' AS role, 'bench' AS audit, '/m/{version}' AS checkpoint_uri, 'x' AS sha256,
                              1000::BIGINT AS n_params, NULL::VARCHAR AS train_config, NULL::VARCHAR AS
                              train_fingerprint, (TIMESTAMP '2026-01-01' + INTERVAL ({v}) HOUR) AS created_at)
                         TO '{lake / "models" / partition_file({"model_version": version})}' (FORMAT parquet)""")
        for attack in ATTACKS:
            key = {"model_version": version, "attack": attack}
            conn.execute(f"""COPY (SELECT '{version}' AS model_version, '{attack}' AS attack,
                                  printf('%016x', i) AS record_id,
                                  (hash(i, '{version}', '{attack}') % 1000003) / 1000003.0 + (i % 2) * 0.1 AS score,
                                  i % 2 = 0 AS is_member, 'bench' AS audit, now()::TIMESTAMP AS computed_at
                                  FROM range({candidates}) t(i))
                             TO '{lake / "membership_scores" / partition_file(key)}' (FORMAT parquet)""")
        conn.execute(f"""COPY (SELECT '{version}' AS model_version, attack, 'bench' AS audit,
                              {candidates // 2} AS n_members, {candidates // 2} AS n_nonmembers, 0.6 AS auc,
                              0.55 AS auc_ci_low, 0.65 AS auc_ci_high, 0.58 AS balanced_accuracy,
                              0.02 AS tpr_at_1pct_fpr, 0.01 AS tpr_at_1pct_fpr_ci_low, 0.03 AS tpr_at_1pct_fpr_ci_high,
                              0.002 AS tpr_at_0_1pct_fpr, 0.0 AS tpr_at_0_1pct_fpr_ci_low,
                              0.004 AS tpr_at_0_1pct_fpr_ci_high, 1000 AS n_bootstrap, 'run' AS mlflow_run_id
                              FROM unnest({list(ATTACKS)}) t(attack))
                         TO '{lake / "attack_metrics" / partition_file({"model_version": version})}'
                         (FORMAT parquet)""")
    conn.close()
    wh.publish_catalog()
    return wh


def timed(conn: duckdb.DuckDBPyConnection, sql: str, repeats: int = 3) -> float:
    conn.execute(sql).fetchall()  # warm-up: file metadata in the OS cache
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        conn.execute(sql).fetchall()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--versions", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="m4i-bench-sql-") as tmp:
        start = time.perf_counter()
        wh = build(Path(tmp), args.rows, args.versions)
        conn = duckdb.connect(str(wh.database), read_only=True)
        (n,) = conn.execute("SELECT count(*) FROM membership_scores").fetchone()
        print(f"generated {n:,} membership_scores rows ({args.versions} model versions x {len(ATTACKS)} attacks) "
              f"in {time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
        for path in sorted((REPO / "sql" / "queries").glob("*.sql")):
            print(f"{path.stem} on {n:,} rows: {timed(conn, sql_file(f'queries/{path.name}')):.2f} s", flush=True)
        conn.close()


if __name__ == "__main__":
    main()
