"""The warehouse: a lake of Parquet files, one per partition, and `warehouse.duckdb`, the SQL entry point.

DuckDB allows one read-write process per database file, and that process excludes every other one,
readers included (dagster issues 16248, 19068); workers on other machines cannot share its lock at all.
So the platform never writes rows into the database file:

- every table of `sql/schema.sql` is a folder `lake/<table>/` of Parquet files, one per partition, named
  by the column values a write replaces (`model_version=clip-...,attack=csa.parquet`). A write fills an
  in-memory DuckDB table of the schema (types, defaults, NOT NULL and primary keys checked), copies it to
  a temporary file and renames it over the partition's file: a re-materialized partition is replaced
  whole, never duplicated nor half-written, and a reader sees either the old file or the new one. Each
  folder's `_schema.parquet` (no rows) carries its columns, so an empty table still answers.
- `warehouse.duckdb` holds views over those folders and the signals' (`signals/<signal>/`), the views of
  `sql/views.sql` and a one-row `m4i_catalog`. It is written when it is missing or its views changed, so a
  user's `duckdb -readonly` session never makes a step fail, and sees new rows when it queries again.
- the platform's own reads run on an in-memory DuckDB with the same views: they never open the file.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import duckdb
import polars as pl

from m4i_assets.data.shards import WHOLE, Shard, shard_of_file

SQL_DIR = Path(os.environ.get("M4I_SQL_DIR", Path(__file__).resolve().parents[2] / "sql"))
LOCK_TIMEOUT_S = 600.0
SCHEMA_FILE = "_schema.parquet"
ALL_ROWS = "all.parquet"  # the one partition of a table written without a key
log = logging.getLogger(__name__)


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


def sql_file(name: str) -> str:
    return (SQL_DIR / name).read_text()


def schema_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the (empty) tables of `sql/schema.sql`."""
    conn = duckdb.connect()
    conn.execute(sql_file("schema.sql"))
    return conn


def table_names() -> list[str]:
    """The tables of the storage contract (`sql/schema.sql`)."""
    return list(_tables_of(sql_file("schema.sql")))


@functools.lru_cache(maxsize=4)
def _tables_of(schema: str) -> tuple[str, ...]:
    with duckdb.connect() as conn:
        conn.execute(schema)
        rows = conn.execute("SELECT table_name FROM duckdb_tables() ORDER BY table_name").fetchall()
    return tuple(r[0] for r in rows)


def partition_file(key: dict[str, object]) -> str:
    """The file name of the partition of a table holding the rows with these column values."""
    if not key:
        return ALL_ROWS
    name = ",".join(f"{col}={quote(str(value), safe='')}" for col, value in key.items()) + ".parquet"
    if len(name) > 240:
        raise ValueError(f"partition key too long for a file name: {key}")
    return name


def key_columns(file_name: str) -> frozenset[str]:
    """The key columns a partition file name encodes (none for `all.parquet`)."""
    stem = file_name.removesuffix(".parquet")
    return frozenset() if file_name == ALL_ROWS else frozenset(part.split("=", 1)[0] for part in stem.split(","))


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _replace_atomically(conn: duckdb.DuckDBPyConnection, table: str, final: Path) -> None:
    """COPY an in-memory table to a temporary file beside `final`, then rename it over `final`."""
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")  # not matched by the views' `*.parquet`
    try:
        conn.execute(f"COPY {table} TO {_quoted(tmp)} (FORMAT parquet)")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


class Warehouse:
    """The lake under `home/lake`, the signal folders under `home/signals`, the catalog `home/warehouse.duckdb`."""

    def __init__(self, home: Path, signals: Sequence[str]):
        self.home = Path(home)
        self.lake = self.home / "lake"
        self.database = self.home / "warehouse.duckdb"
        self.signals = {name: self.home / "signals" / name for name in signals}

    # --- the lake -------------------------------------------------------------------------------------------

    def ensure_lake(self) -> None:
        """Each table's and signal's folder with its `_schema.parquet`, (re)written when `sql/schema.sql` changed."""
        stamp = self.lake / ".schema-sha256"
        digest = hashlib.sha256(sql_file("schema.sql").encode()).hexdigest()
        if (
            stamp.is_file()
            and stamp.read_text() == digest
            and all((d / SCHEMA_FILE).is_file() for d in self._folders().values())
        ):
            return
        with schema_connection() as conn:
            for table in table_names():
                (self.lake / table).mkdir(parents=True, exist_ok=True)
                _replace_atomically(conn, table, self.lake / table / SCHEMA_FILE)
            # A signal's columns are its writer's; these two are common to all, the rest come from its files.
            conn.execute("CREATE TABLE _signal (model_version VARCHAR, record_id VARCHAR)")
            for folder in self.signals.values():
                folder.mkdir(parents=True, exist_ok=True)
                _replace_atomically(conn, "_signal", folder / SCHEMA_FILE)
        tmp = stamp.with_suffix(f".{uuid.uuid4().hex}")
        tmp.write_text(digest)
        os.replace(tmp, stamp)

    def _folders(self) -> dict[str, Path]:
        return {**{t: self.lake / t for t in table_names()}, **self.signals}

    def write(self, table: str, frame: pl.DataFrame, **key: object) -> int:
        """Replace the partition of `table` holding the rows whose columns equal `key` with `frame` (key columns
        it lacks are filled in; rows with other key values are an error). Returns the rows written."""
        self.write_many([(table, frame, key)])
        return frame.height

    def write_many(self, partitions: list[tuple[str, pl.DataFrame, dict[str, object]]]) -> None:
        """Several partitions, each checked against the schema before any file is replaced."""
        self.ensure_lake()
        with schema_connection() as conn:
            staged = []
            for i, (table, frame, key) in enumerate(partitions):
                folder = self._table_dir(table)
                name = partition_file(key)
                clash = {p.name for p in folder.glob("*.parquet") if key_columns(p.name) != frozenset(key)}
                if clash - {SCHEMA_FILE}:
                    raise ValueError(f"{table} is partitioned by other columns than {sorted(key)}: {sorted(clash)[:3]}")
                frame = frame.with_columns(**{c: pl.lit(v) for c, v in key.items() if c not in frame.columns})
                for col, value in key.items():
                    if frame.height and not (frame[col] == value).all():
                        raise ValueError(f"rows of {table} with {col} other than {value!r} in its {name} partition")
                if frame.height:  # into the schema's table: types, defaults, NOT NULL and primary key checked
                    conn.register("_incoming", frame.to_arrow())
                    conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _incoming")
                    conn.unregister("_incoming")
                staging = f"_stage{i}"
                conn.execute(f"CREATE TEMP TABLE {staging} AS FROM {table}")
                conn.execute(f"DELETE FROM {table}")
                staged.append((staging, folder / name))
            for staging, final in staged:
                _replace_atomically(conn, staging, final)
        self.publish_catalog()

    def _table_dir(self, table: str) -> Path:
        folder = self.lake / table
        if not (folder / SCHEMA_FILE).is_file():
            raise ValueError(f"{table!r} is not a table of sql/schema.sql ({', '.join(table_names())})")
        return folder

    def merge_shards(self, dataset: str, shards: list[tuple[Path, Path]]) -> None:
        """Replace `dataset`'s partitions of `records` and `rejects` with its shards' (records, rejects) Parquet
        files. A record id already seen in an earlier shard (or earlier in the same one) becomes a `duplicate`
        reject, so the outcome does not depend on which shard was ingested last."""
        record_files = [str(r) for r, _ in shards]
        reject_files = [str(j) for _, j in shards]
        with duckdb.connect() as conn:
            incoming = conn.sql(
                """SELECT * EXCLUDE (filename, file_row_number),
                          row_number() OVER w AS copy, first(source_locator) OVER w AS first_locator
                   FROM read_parquet($files, filename = true, file_row_number = true)
                   WINDOW w AS (PARTITION BY record_id ORDER BY list_position($files, filename), file_row_number
                                ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)""",
                params={"files": record_files},
            ).pl()
            rejects = conn.sql("SELECT * FROM read_parquet(?, union_by_name = true)", params=[reject_files]).pl()
        duplicates = incoming.filter(pl.col("copy") > 1).select(
            source=pl.col("dataset"), locator=pl.col("source_locator"), reason=pl.lit("duplicate"),
            detail=pl.format("same image bytes and caption as {} ({})", "first_locator", "record_id"),
        )  # fmt: skip
        records = incoming.filter(pl.col("copy") == 1).drop("copy", "first_locator")
        rejects = pl.concat([duplicates, rejects], how="diagonal_relaxed")
        self.write_many([("records", records, {"dataset": dataset}), ("rejects", rejects, {"source": dataset})])

    def write_signal(self, signal: str, model_version: str, frame: pl.DataFrame, shard: Shard = WHOLE) -> Path:
        """One shard of one model version's signal, `signals/<signal>/<shard.file_name(version)>`, replaced
        atomically; the version's files of another shard count (an earlier sharding) are removed, so the folder
        never holds a record of the version twice."""
        self.ensure_lake()
        folder = self.signals[signal]
        final = folder / shard.file_name(model_version)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        try:
            frame.write_parquet(tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        for stale, other in self.signal_files(signal, model_version):
            if other.count != shard.count:
                stale.unlink(missing_ok=True)
        self.publish_catalog()
        return final

    def signal_files(self, signal: str, model_version: str) -> list[tuple[Path, Shard]]:
        """The files of one version's signal with the shard each holds, in shard order."""
        folder = self.signals[signal]
        whole = folder / WHOLE.file_name(model_version)
        found = [(whole, WHOLE)] if whole.is_file() else []
        prefix = f"{model_version}.shard-"
        for path in folder.glob("*.parquet") if folder.is_dir() else []:
            if path.name.startswith(prefix) and (parsed := shard_of_file(path.name)) and parsed[0] == model_version:
                found.append((path, parsed[1]))
        return sorted(found, key=lambda f: (f[1].count, f[1].index))

    # --- reading: the views ---------------------------------------------------------------------------------

    def view_sql(self) -> str:
        """The DDL of every view: one per table and signal folder (over its Parquet files), then `sql/views.sql`."""
        folders = self._folders()
        views = [
            f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({_quoted(folder / '*.parquet')}, "
            "union_by_name = true);"
            for name, folder in folders.items()
        ]
        return "\n".join(views) + "\n" + sql_file("views.sql")

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB connection with the warehouse's views: reads every table, locks nothing."""
        self.ensure_lake()
        conn = duckdb.connect()
        try:
            conn.execute(self.view_sql())
            yield conn
        finally:
            conn.close()

    def read(self, sql: str, params: list | None = None) -> pl.DataFrame:
        with self.reader() as conn:
            return conn.sql(sql, params=params or None).pl()

    def publish_catalog(self) -> bool:
        """Write `warehouse.duckdb` (the views and `m4i_catalog`) when it is missing or its views changed. When a
        reader holds the file (a `duckdb -readonly` session), say so and leave it: its views read the lake's
        folders, so it already sees every new file. Returns whether the file is current."""
        self.ensure_lake()
        ddl = self.view_sql()
        version = hashlib.sha256(ddl.encode()).hexdigest()
        stamp = self.database.with_suffix(".version")
        if stamp.is_file() and stamp.read_text() == version and self.database.is_file():
            return True
        with file_lock(self.database.with_suffix(".lock")):
            if stamp.is_file() and stamp.read_text() == version and self.database.is_file():
                return True
            try:
                conn = duckdb.connect(str(self.database))
            except duckdb.IOException as exc:
                log.warning("warehouse.duckdb's views not updated (a reader holds the file): %s", exc)
                return False
            try:
                tables = {r[0] for r in conn.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
                if old := tables & set(self._folders()):
                    raise RuntimeError(
                        f"{self.database} holds tables ({', '.join(sorted(old))}) of a warehouse made before the "
                        f"Parquet lake: move it away or `make clean` to rebuild it"
                    )
                conn.execute(ddl)
                conn.execute("CREATE OR REPLACE TABLE m4i_catalog AS SELECT ? AS version, ? AS lake, now() AS "
                             "published_at", [version, str(self.lake)])  # fmt: skip
            finally:
                conn.close()
            tmp = stamp.with_suffix(f".{uuid.uuid4().hex}")
            tmp.write_text(version)
            os.replace(tmp, stamp)
        return True
