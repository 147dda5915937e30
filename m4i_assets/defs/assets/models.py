"""Model assets: the audit's CLIPs (target, null control, references) and the per-version checkpoint.

Training assets write a checkpoint, register it in `models` and add its `model_version` as a
dynamic partition; everything downstream is partitioned by model version, so a new version adds a
partition and never overwrites an earlier one.
"""

import hashlib
import json
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from dagster import AssetExecutionContext, AssetSpec, MaterializeResult, MetadataValue, asset, multi_asset

from m4i_assets.defs.assets.data import record_roles
from m4i_assets.defs.partitions import model_versions
from m4i_assets.defs.resources import Compute, Storage
from m4i_assets.models.checkpoints import model_version_for, safetensors_tensor_count, sha256_file
from m4i_assets.settings import AuditSettings
from m4i_assets.storage.warehouse import replace_rows


def register_checkpoint(
    context: AssetExecutionContext,
    storage: Storage,
    staged_dir: Path,
    sha256: str,
    row: dict,
) -> str:
    """Move a staged checkpoint folder to `models/<version>/`, upsert its `models` row, add its partition."""
    version = model_version_for(row["family"], sha256)
    final = storage.models_dir / version
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged_dir), final)
    frame = pl.DataFrame(
        [{**row, "model_version": version, "sha256": sha256, "checkpoint_uri": str(final / "model.safetensors")}]
    )
    with storage.connect() as conn:
        replace_rows(conn, "models", frame, model_version=version)
    context.instance.add_dynamic_partitions(model_versions.name, [version])
    return version


def seeded_sample(frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """`n` rows of `frame` chosen with `seed`, in their original order."""
    if n >= frame.height:
        return frame
    return frame[np.sort(np.random.default_rng(seed).choice(frame.height, n, replace=False))]


@dataclass(frozen=True)
class _Pending:
    """A model to train: where its result goes, its role, records and recipe, where it is staged."""

    index: int
    role: str
    train: pl.DataFrame
    spec: Any
    fingerprint: str
    staged: Path

    def arguments(self, audit: str, device: str | None, threads: int | None) -> tuple:
        """The arguments of `clip.train_and_save` (plain values: they cross into worker processes)."""
        uris, captions = self.train["image_uri"].to_list(), self.train["caption"].to_list()
        return self.spec, uris, captions, self.staged, {"role": self.role, "audit": audit}, device, threads


def train_and_register(
    context: AssetExecutionContext,
    settings: AuditSettings,
    storage: Storage,
    compute: Compute,
    jobs: list[tuple[str, pl.DataFrame, int]],
) -> list[dict]:
    """Train CLIPs with the audit's recipe, one per (model role, training records, seed offset), save
    them and register each as a model version.

    A model whose fingerprint (recipe and training record ids, which hash image bytes and captions)
    is registered with an intact checkpoint is reused, unless `settings.retrain`. Several models
    train in parallel worker processes of one thread each on a CPU (`compute.training_workers`)."""
    from m4i_assets.models import clip

    results: list[dict | None] = [None] * len(jobs)
    todo = []
    for i, (model_role, train, seed_offset) in enumerate(jobs):
        spec = settings.clip_train_spec(seed_offset)
        fingerprint = hashlib.sha256(
            json.dumps({"spec": asdict(spec), "records": train["record_id"].to_list()}, sort_keys=True).encode()
        ).hexdigest()
        reusable = None if settings.retrain else find_reusable(storage, settings.audit, model_role, fingerprint)
        if reusable:
            context.instance.add_dynamic_partitions(model_versions.name, [reusable["model_version"]])
            context.log.info(f"{model_role}: reusing {reusable['model_version']} (same recipe and training records)")
            results[i] = {"model_version": reusable["model_version"], "sha256": reusable["sha256"], "reused": True}
        else:
            todo.append(_Pending(i, model_role, train, spec, fingerprint, Path(tempfile.mkdtemp(dir=storage.root))))

    device = compute.torch_device
    if min(len(todo), compute.training_workers) > 1:
        with ProcessPoolExecutor(max_workers=compute.training_workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(clip.train_and_save, *job.arguments(settings.audit, device, 1)) for job in todo]
            fitted = [f.result() for f in futures]
    else:
        fitted = [clip.train_and_save(*job.arguments(settings.audit, device, None)) for job in todo]

    for job, (sha, history, n_params) in zip(todo, fitted):
        context.log.info(
            f"{job.role}: {job.spec.epochs} epochs on {job.train.height} records, final loss {history[-1]:.4f}"
        )
        row = {"family": clip.FAMILY, "arch": job.spec.arch, "role": job.role, "audit": settings.audit,
               "n_params": n_params, "train_config": json.dumps(asdict(job.spec)),
               "train_fingerprint": job.fingerprint}  # fmt: skip
        version = register_checkpoint(context, storage, job.staged, sha, row)
        shutil.rmtree(job.staged, ignore_errors=True)
        results[job.index] = {"model_version": version, "sha256": sha, "final_loss": history[-1], "reused": False}
    return [{**r, "role": role, "n_train": train.height} for r, (role, train, _) in zip(results, jobs)]


def find_reusable(storage: Storage, audit: str, model_role: str, fingerprint: str) -> dict | None:
    """A registered model with this training fingerprint whose checkpoint is intact, if any."""
    rows = storage.read(
        "SELECT * FROM models WHERE train_fingerprint = ? AND role = ? AND audit = ? ORDER BY created_at DESC",
        [fingerprint, model_role, audit],
    ).to_dicts()
    for row in rows:
        if Path(row["checkpoint_uri"]).is_file() and sha256_file(row["checkpoint_uri"]) == row["sha256"]:
            return row
    return None


@multi_asset(
    specs=[
        AssetSpec("target_clip", deps=[record_roles], kinds={"pytorch"},
                  description="The audited CLIP, trained on the members."),
        AssetSpec("null_control_clip", deps=[record_roles], kinds={"pytorch"},
                  description="Same recipe and budget on population records only: it never sees a candidate "
                  "(ATTACKS.md section 4), so every attack on it must be at chance."),
        AssetSpec("reference_clips", deps=[record_roles], kinds={"pytorch"},
                  description="Reference CLIPs for the calibrated attack (LiRA, Carlini et al. 2022), each with "
                  "the target's recipe on a seeded random half of the population."),
    ],
    group_name="models",
    can_subset=True,
)  # fmt: skip
def clip_models(context: AssetExecutionContext, settings: AuditSettings, storage: Storage, compute: Compute):
    """The audit's CLIPs, trained in one step so that all of them share the cores (one
    single-threaded worker per core measured 15% more throughput than one model on two threads)."""
    population = storage.audit_records(settings.audit, ("population",))
    plan = {
        "target_clip": [("target", storage.audit_records(settings.audit, ("member",)), 0)],
        # A non-member training set is cut to the member set's size: the same training budget.
        "null_control_clip": [("null_control", seeded_sample(population, settings.n_members, settings.seed + 1), 1)],
        "reference_clips": [
            ("reference", seeded_sample(population, population.height // 2, settings.seed + 100 + r), 100 + r)
            for r in range(settings.n_reference_models)
        ],
    }
    selected = [key.to_user_string() for key in context.selected_asset_keys]
    trained = iter(train_and_register(context, settings, storage, compute, [j for k in selected for j in plan[k]]))
    for key in selected:
        results = [next(trained) for _ in plan[key]]
        metadata = results[0] if len(results) == 1 else {"models": MetadataValue.json(results)}
        yield MaterializeResult(asset_key=key, metadata={**metadata, "arch": settings.clip_arch})


@asset(group_name="models", partitions_def=model_versions, deps=[clip_models], kinds={"pytorch"})
def model_checkpoint(context: AssetExecutionContext, storage: Storage) -> MaterializeResult:
    """One model version: its checkpoint verified against the registered sha256 and its header parsed
    (weights are loaded by the signal assets, which name the file in any error)."""
    info = storage.model_info(context.partition_key)
    actual = sha256_file(info["checkpoint_uri"])
    if actual != info["sha256"]:
        raise ValueError(f"{info['checkpoint_uri']}: sha256 {actual} differs from the registered {info['sha256']}")
    n_tensors = safetensors_tensor_count(info["checkpoint_uri"])
    return MaterializeResult(
        metadata={
            "n_tensors": n_tensors,
            **{k: str(info[k]) for k in ("arch", "role", "audit", "sha256", "checkpoint_uri")},
        }
    )
