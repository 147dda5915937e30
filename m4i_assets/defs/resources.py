"""Dagster resources: where the platform writes (Storage) and how it records runs (Tracking)."""

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
from dagster import ConfigurableResource, InitResourceContext

from m4i_assets.families import SHADOW_ROLES
from m4i_assets.models.checkpoints import model_version_for
from m4i_assets.storage.warehouse import Warehouse, file_lock

# Per-(model version, record) signals stored as Parquet and exposed as warehouse views of these names.
SIGNALS = ("embeddings", "augmentation_deltas", "generated_captions", "caption_metrics", "m4i_scenario_scores",
           "caption_nll")


class Storage(ConfigurableResource):
    """Everything under one folder, `$M4I_HOME`: the DuckDB warehouse, checkpoints, corpus, signals."""

    home: str

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

    def register_model(
        self, folder: Path, sha256: str, row: dict[str, Any], move: bool, weights: str = "model.safetensors"
    ) -> str:
        """Put a checkpoint folder at `models/<version>/` (moved, or copied when `move` is false), upsert its
        `models` row and return its model version (the family and the sha256 of the folder's `weights` file
        name it; that file is the row's `checkpoint_uri`)."""
        version = model_version_for(row["family"], sha256, row["audit"])
        final = self.models_dir / version
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(folder), final) if move else shutil.copytree(folder, final)
        frame = pl.DataFrame(
            [{**row, "model_version": version, "sha256": sha256, "checkpoint_uri": str(final / weights)}]
        )
        self.write("models", frame, model_version=version)
        return version

    def register_release(self, base: dict[str, Any], defense: str, strength: float, facts: dict[str, Any]) -> str:
        """Register a release-time defense of the version `base` (its `models` row): a version of its own, with
        the same checkpoint, role `defended`; return the version."""
        from m4i_assets.defenses.grid import release_version

        version = release_version(base["model_version"], defense, strength, facts.get("queries", 1))
        row = {k: base[k] for k in ("family", "arch", "audit", "checkpoint_uri", "sha256", "n_params", "train_config",
                                    "train_dataset")}  # fmt: skip
        row |= {"model_version": version, "role": "defended", "defense": defense, "defense_strength": strength,
                "base_version": base["model_version"], "defense_facts": json.dumps(facts)}  # fmt: skip
        self.write("models", pl.DataFrame([row]), model_version=version)
        return version

    def model_info(self, model_version: str) -> dict[str, Any]:
        """The `models` row of a version; a clear error when it was never registered."""
        rows = self.read("SELECT * FROM models WHERE model_version = ?", [model_version]).to_dicts()
        if not rows:
            raise LookupError(f"model version {model_version!r} is not registered in {self.database}")
        return rows[0]

    def audit_records(self, audit: str, roles: tuple[str, ...], dataset: str | None = None) -> pl.DataFrame:
        """Records of the given roles of an audit (of one dataset, if given) with their role and ground
        truth, by record_id. A record is read from the dataset its role names: a record's identity (its
        content hash) and its membership in a dataset are separate facts, and two datasets may share records."""
        return self.read(
            f"""SELECT x.record_id, r.dataset, r.image_uri, r.caption, x.role, x.is_member FROM record_roles x
                JOIN records r ON r.record_id = x.record_id AND r.dataset = x.dataset
                WHERE x.audit = ? AND x.role IN ({", ".join("?" * len(roles))}) AND r.dataset = coalesce(?, r.dataset)
                ORDER BY x.record_id""",
            [audit, *roles, dataset],
        )

    def references(self, record_ids: list[str]) -> list[list[str]]:
        """Every reference caption of each record's image (records that share an image file), in order."""
        frame = self.read(
            """SELECT q.i, list(r.caption ORDER BY r.caption) AS refs
               FROM (SELECT unnest(?::VARCHAR[]) AS record_id, generate_subscripts(?::VARCHAR[], 1) AS i) q
               JOIN (SELECT DISTINCT ON (record_id) record_id, image_uri FROM records) m USING (record_id)
               JOIN (SELECT DISTINCT image_uri, caption FROM records) r USING (image_uri)
               GROUP BY q.i ORDER BY q.i""",
            [record_ids, record_ids],
        )
        if frame.height != len(record_ids):
            raise LookupError(f"{len(record_ids) - frame.height} of {len(record_ids)} records are not in `records`")
        return frame["refs"].to_list()

    def captioned_records(self, model_version: str) -> pl.DataFrame:
        """The records a captioner is queried on, with ground truth: a shadow model's known members and
        non-members (`shadow_records`), else the audit's candidates."""
        info = self.model_info(model_version)
        if info["role"] not in SHADOW_ROLES:
            return self.audit_records(info["audit"], ("member", "nonmember", "candidate"))
        return self.read(
            """SELECT s.record_id, r.dataset, r.image_uri, r.caption, s.is_member FROM shadow_records s
               JOIN record_roles x ON x.record_id = s.record_id AND x.audit = ?
               JOIN records r ON r.record_id = s.record_id AND r.dataset = x.dataset
               WHERE s.model_version = ? ORDER BY s.record_id""",
            [info["audit"], model_version],
        )

    def latest_versions(self, audit: str, role: str, n: int = 1, family: str = "clip") -> list[str]:
        """The `n` most recently registered model versions of one role and family in an audit, newest first."""
        return self.read(
            """SELECT model_version FROM models WHERE audit = ? AND role = ? AND family = ?
               ORDER BY created_at DESC LIMIT ?""",
            [audit, role, family, n],
        )["model_version"].to_list()

    def shadow_models(self, audit: str, versions: list[str] | None = None) -> list[dict[str, Any]]:
        """The newest shadow captioner of each (training dataset, architecture, training seed) in an audit,
        with its seed as `train_seed`; with `versions`, of those versions (e.g. the shadows an adaptive
        attacker trained with a defense, role `defended_shadow`) instead of the undefended shadows."""
        return self.read(
            """SELECT DISTINCT ON (train_dataset, arch, train_seed) * FROM
                   (SELECT *, CAST(json_extract(train_config, '$.seed') AS INTEGER) AS train_seed FROM models
                    WHERE audit = ? AND family = 'captioner'
                      AND (role = 'shadow' AND ? IS NULL OR list_contains(coalesce(?, []), model_version)))
               ORDER BY train_dataset, arch, train_seed, created_at DESC""",
            [audit, versions, versions],
        ).to_dicts()

    def reference_versions(self, audit: str, n: int) -> list[str]:
        """The `n` latest reference models of an audit, sorted; an error if there are fewer."""
        versions = self.latest_versions(audit, "reference", n)
        if len(versions) < n:
            raise LookupError(
                f"audit {audit!r} has {len(versions)} reference models, {n} needed: materialize reference_clips"
            )
        return sorted(versions)


# The op tag of steps that run torch models (training, embedding, captioning): under the Celery executor they
# go to the `gpu` queue, served by one worker per device; every other step goes to the default queue.
GPU_STEP = {"dagster-celery/queue": "gpu"}


class Compute(ConfigurableResource):
    """Where torch runs. `device="auto"` takes CUDA (with AMP) when present, else the CPU. On the CPU,
    `torch_threads=0` shares the cores among the executor's concurrent steps: oversubscribed OpenMP
    threads made two parallel trainings twice as slow as running them one after the other."""

    device: str = "auto"
    torch_threads: int = 0
    concurrent_steps: int = 2

    def setup_for_execution(self, context: InitResourceContext) -> None:
        import torch

        threads = self.torch_threads or max(1, (os.cpu_count() or 1) // max(1, self.concurrent_steps))
        torch.set_num_threads(threads)

    @property
    def training_workers(self) -> int:
        """How many models one step may train at once in worker processes: one on a GPU (they share
        it), else one per core (single-threaded workers timeslice well beside other steps)."""
        return 1 if self._cuda() else os.cpu_count() or 1

    def _cuda(self) -> bool:
        import torch

        return self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())

    @property
    def torch_device(self) -> str | None:
        """The device name for the model adapters (None = pick automatically)."""
        return None if self.device == "auto" else self.device


def _metrics(metrics: dict[str, float], timestamp_ms: int) -> list:
    """MLflow metrics; a name's characters MLflow refuses (anything but letters, digits and `_-. /`, e.g. the
    `+` and `=` of a release-time defense's version) become `_`."""
    from mlflow.entities import Metric

    return [Metric(re.sub(r"[^\w\-. /]", "_", k), float(v), timestamp_ms, 0) for k, v in metrics.items()]


class Tracking(ConfigurableResource):
    """MLflow tracking (sqlite store beside the warehouse). Writers are serialised by a file lock,
    and the experiment is created once under it: SQLite MLflow races on schema init otherwise."""

    tracking_uri: str
    artifact_root: str
    experiment: str = "m4i-audits"

    def _client_and_experiment(self):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(
                self.experiment, artifact_location=Path(self.artifact_root).resolve().as_uri()
            )
        )
        return client, exp_id

    def log_artifacts(self, run_id: str, artifacts: dict[str, bytes]) -> None:
        """Add files (name -> bytes) to an existing MLflow run."""
        with file_lock(self._lock):
            client, _ = self._client_and_experiment()
            self._upload(client, run_id, artifacts)

    def log_metrics(self, run_id: str, metrics: dict[str, float], artifacts: dict[str, bytes]) -> None:
        """Add metrics and files to an existing MLflow run."""
        with file_lock(self._lock):
            client, _ = self._client_and_experiment()
            now_ms = int(time.time() * 1000)
            client.log_batch(run_id, metrics=_metrics(metrics, now_ms))
            self._upload(client, run_id, artifacts)

    @property
    def _lock(self) -> Path:
        return Path(self.artifact_root).parent / "mlflow.lock"

    @staticmethod
    def _upload(client, run_id: str, artifacts: dict[str, bytes]) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in artifacts.items():
                path = Path(tmp) / name
                path.write_bytes(data)
                client.log_artifact(run_id, str(path))

    def log_run(
        self,
        run_name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: dict[str, bytes],
    ) -> str:
        """Create one finished MLflow run with params, metrics and artifacts; return its id."""
        from mlflow.entities import Param, RunTag

        with file_lock(self._lock):
            client, exp_id = self._client_and_experiment()
            run = client.create_run(exp_id, run_name=run_name, tags=tags)
            run_id = run.info.run_id
            now_ms = int(time.time() * 1000)
            client.log_batch(
                run_id,
                metrics=_metrics(metrics, now_ms),
                params=[Param(k, v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
            self._upload(client, run_id, artifacts)
            client.set_terminated(run_id)
        return run_id
