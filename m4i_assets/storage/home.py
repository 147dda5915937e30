"""Everything the platform keeps lives under one folder, `$M4I_HOME` (README, Storage contract): the
warehouse (`storage.warehouse`), checkpoints, trained attack models, corpora and signals. `Home` holds the paths,
the warehouse connection and every write; reads of the audit's facts go through `storage.repository`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from m4i_assets.storage.repository import Repository
from m4i_assets.storage.warehouse import Warehouse

# Per-(model version, record) signals stored as Parquet and exposed as warehouse views of these names.
SIGNALS = ("embeddings", "augmentation_deltas", "generated_captions", "caption_metrics", "m4i_scenario_scores",
           "caption_nll")  # fmt: skip


class Home:
    """The folder `home` (a str field of the Dagster resource that mixes this in): paths, connection, writes."""

    home: str

    def __init__(self, home: str | Path) -> None:
        self.home = str(home)

    @property
    def root(self) -> Path:
        return Path(self.home)

    @property
    def database(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def corpus_dir(self, name: str) -> Path:
        return self.root / "corpus" / name

    def signal_dir(self, signal: str) -> Path:
        return self.root / "signals" / signal

    @property
    def warehouse(self) -> Warehouse:
        """The Parquet lake and its SQL entry point (see `storage.warehouse`)."""
        return Warehouse(self.root, SIGNALS)

    @property
    def repository(self) -> Repository:
        """A fresh repository of the warehouse's facts: one per asset, so each fact is read once in it."""
        return Repository(self.warehouse)

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB with every table and view of the warehouse; it locks nothing."""
        with self.warehouse.reader() as conn:
            yield conn

    def read(self, sql: str, params: list | None = None) -> pl.DataFrame:
        return self.warehouse.read(sql, params)

    def write(self, table: str, frame: pl.DataFrame, **key: Any) -> int:
        """Replace the partition of `table` whose columns equal `key` (e.g. model_version=...) with `frame`."""
        return self.warehouse.write(table, frame, **key)

    def attack_model_path(self, model_version: str, filename: str) -> Path:
        """Where a trained attack model of a model version is kept (e.g. `wsa.safetensors`)."""
        return self.models_dir / "attacks" / model_version / filename

    def write_attack_model(self, model_version: str, filename: str, data: bytes) -> dict[str, str]:
        """Store a trained attack model's bytes; return its path and sha256 (for the asset's metadata)."""
        path = self.attack_model_path(model_version, filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {"path": str(path), "sha256": hashlib.sha256(data).hexdigest()}

    def read_attack_model(self, model_version: str, filename: str, asset: str) -> bytes:
        """A stored attack model's bytes; a clear error naming the `asset` that makes it when it is missing."""
        path = self.attack_model_path(model_version, filename)
        if not path.is_file():
            raise FileNotFoundError(f"{model_version} has no {filename}: materialize {asset} for it ({path})")
        return path.read_bytes()
