"""The DuckDB warehouse: schema, serialised connections and partition-replacing writes.

DuckDB allows one read-write process per file, so parallel Dagster steps or runs hit "Could not set
lock on file" (dagster issues 16248, 19068). Every connection the platform opens holds an
inter-process file lock beside the database for as long as it is open, and assets open it only after
their compute, for the write itself: writers queue for a moment instead of failing. Heavy signals
(embeddings) are Parquet files exposed as views, so they never pass through the lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import polars as pl

SQL_DIR = Path(os.environ.get("M4I_SQL_DIR", Path(__file__).resolve().parents[2] / "sql"))
LOCK_TIMEOUT_S = 600.0


@contextmanager
def file_lock(path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive advisory lock on `path` across processes (fcntl), waiting up to `timeout_s`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout_s:.0f}s for the lock {path}") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def connect(database: str | os.PathLike, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the warehouse under its lock, with the schema in place."""
    database = Path(database)
    database.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(database.with_suffix(".lock")):
        conn = duckdb.connect(str(database), read_only=read_only)
        try:
            if not read_only:
                conn.execute(sql_file("schema.sql"))
            yield conn
        finally:
            conn.close()


def sql_file(name: str) -> str:
    return (SQL_DIR / name).read_text()


def replace_rows(conn: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame, **where: str) -> int:
    """Delete the rows of `table` matching `where` (column=value), then insert `frame` by column name.

    One transaction: a partition is replaced whole or not at all. Returns rows inserted.
    """
    conn.execute("BEGIN TRANSACTION")
    try:
        if where:
            clause = " AND ".join(f"{col} = ?" for col in where)
            conn.execute(f"DELETE FROM {table} WHERE {clause}", list(where.values()))
        else:
            conn.execute(f"DELETE FROM {table}")
        if frame.height:
            conn.register("_incoming", frame.to_arrow())
            conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _incoming")
            conn.unregister("_incoming")
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise
    return frame.height


def refresh_views(conn: duckdb.DuckDBPyConnection, parquet_views: dict[str, Path]) -> None:
    """(Re)create the views of `sql/views.sql` and one view per Parquet signal folder that has files."""
    conn.execute(sql_file("views.sql"))
    for view, folder in parquet_views.items():
        if any(folder.glob("*.parquet")):
            conn.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet('{folder}/*.parquet')")


def query(conn: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> pl.DataFrame:
    return conn.sql(sql, params=params or None).pl()


def merge_shards(conn: duckdb.DuckDBPyConnection, dataset: str, shards: list[tuple[Path, Path]]) -> None:
    """Replace `dataset`'s rows of `records` and `rejects` with its shards' (records, rejects) Parquet files,
    in one transaction. A record id already seen in an earlier shard (or earlier in the same one) becomes a
    `duplicate` reject, so the outcome does not depend on which shard was ingested last."""
    record_files = [str(r) for r, _ in shards]
    reject_files = [str(j) for _, j in shards]
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute("DELETE FROM records WHERE dataset = ?", [dataset])
        conn.execute("DELETE FROM rejects WHERE source = ?", [dataset])
        conn.execute(
            """CREATE OR REPLACE TEMP TABLE _incoming AS
               SELECT * EXCLUDE (filename, file_row_number),
                      row_number() OVER w AS copy, first(source_locator) OVER w AS first_locator
               FROM read_parquet($files, filename = true, file_row_number = true)
               WINDOW w AS (PARTITION BY record_id ORDER BY list_position($files, filename), file_row_number
                            ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)""",
            {"files": record_files},
        )
        conn.execute("INSERT INTO records BY NAME SELECT * EXCLUDE (copy, first_locator) FROM _incoming WHERE copy = 1")
        conn.execute(
            """INSERT INTO rejects BY NAME
               SELECT dataset AS source, source_locator AS locator, 'duplicate' AS reason,
                      'same image bytes and caption as ' || first_locator || ' (' || record_id || ')' AS detail
               FROM _incoming WHERE copy > 1"""
        )
        conn.execute("INSERT INTO rejects BY NAME SELECT * FROM read_parquet(?)", [reject_files])
        conn.execute("DROP TABLE _incoming")
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise
