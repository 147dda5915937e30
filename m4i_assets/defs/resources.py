"""Dagster resources: where the platform writes (Storage) and how it records runs (Tracking)."""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import polars as pl
from dagster import ConfigurableResource, InitResourceContext

from m4i_assets.models.checkpoints import model_version_for
from m4i_assets.storage.home import SIGNALS, Home
from m4i_assets.storage.tracking import Mlflow

__all__ = ["SIGNALS", "Compute", "Storage", "Tracking"]


class Storage(ConfigurableResource, Home):
    """Everything under one folder, `$M4I_HOME` (`storage.home.Home`: paths, the warehouse connection, writes;
    `storage.repository` for the reads)."""

    home: str

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


class Tracking(ConfigurableResource, Mlflow):
    """MLflow tracking (sqlite store beside the warehouse; `storage.tracking.Mlflow`)."""

    tracking_uri: str
    artifact_root: str
    experiment: str = "m4i-audits"
