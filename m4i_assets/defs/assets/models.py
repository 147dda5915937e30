"""Model assets: the audit's CLIPs (target, null control, references), its captioners (target, null
control, shadows) and the per-version checkpoint.

Training assets write a checkpoint, register it in `models` and add an audited version (not a helper) as a
dynamic partition of its family's assets (`defs.partitions`); everything downstream is partitioned by model
version, so a new version adds a partition and never overwrites an earlier one.
"""

import json
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from dagster import AssetExecutionContext, AssetKey, AssetSpec, MaterializeResult, MetadataValue, asset, multi_asset

from m4i_assets import plans
from m4i_assets.data.audits import AuditSpec
from m4i_assets.defs.assets.data import record_roles
from m4i_assets.defs.partitions import VERSION_PARTITIONS, add_versions, is_audited, version_key
from m4i_assets.defs.resources import GPU_STEP, Compute, Storage
from m4i_assets.families import FAMILIES, Family, stage_checkpoint
from m4i_assets.models.checkpoints import checkpoint_tensor_count, sha256_file
from m4i_assets.plans import TrainJob
from m4i_assets.settings import AuditSettings


def train_and_register(
    context: AssetExecutionContext,
    settings: AuditSettings,
    storage: Storage,
    compute: Compute,
    family: ModuleType,
    jobs: list[TrainJob],
) -> list[dict]:
    """`plans.train_and_register` in a step: each audited version it trains or reuses becomes a partition of its
    family's assets (a helper does not: `partitions.is_audited`)."""

    def announce(version: str, role: str) -> None:
        if is_audited(family.FAMILY, role):
            add_versions(context.instance, family.FAMILY, [version])

    def register(staged: Path, sha256: str, row: dict) -> str:
        version = storage.register_model(staged, sha256, row, move=True)
        announce(version, row["role"])
        return version

    return plans.train_and_register(jobs, family, settings, storage, register, announce, context.log.info,
                                    compute.torch_device, compute.training_workers)  # fmt: skip


DESCRIPTIONS = {
    "target": "The audited model, trained on the members (or registered from the audit registry).",
    "null_control": "Same recipe and budget on population records only: it never sees a candidate (the rules of "
    "evidence), so every attack on it must be at chance.",
    "reference": "Reference CLIPs for the calibrated attacks (LiRA, Carlini et al. 2022), each with the target's "
    "recipe on a seeded random half of the population.",
    "shadow": "The attacker's shadow captioners (M^4I section 3): one per (population dataset, shadow "
    "architecture), each trained on a seeded half of that dataset's population, the other half its known "
    "non-members. None sees a candidate.",
}


def training_asset(family: Family):
    """The training multi-asset of one family of the registry (`<family>_models`): its target, null control and
    helpers, trained in one step so that all of them share the cores (one single-threaded worker per core
    measured 15% more throughput than one model on two threads), as `plans.controlled_plan` says. An audit of
    the registry registers its checkpoints instead, and trains the shadow captioners on its population."""
    roles = ("target", "null_control", family.helper_role)

    @multi_asset(
        name=f"{family.name}_models",
        specs=[AssetSpec(key, deps=[record_roles], kinds={"pytorch"}, description=DESCRIPTIONS[role])
               for key, role in zip(family.models, roles)],
        group_name="models",
        can_subset=True,
        op_tags=GPU_STEP,
    )  # fmt: skip
    def _models(context: AssetExecutionContext, settings: AuditSettings, storage: Storage, compute: Compute):
        audit = settings.registered_audit(storage.root)
        records = partial(storage.repository.audit_records, settings.audit)
        if audit is None:
            plan = plans.controlled_plan(family, settings, records)
        else:
            selected = {key.to_user_string() for key in context.selected_asset_keys}
            trained = selected & {family.models[2]} if family.helper_role == "shadow" else set()
            if selected - trained:
                yield from register_audit_models(context, storage, audit, family, selected - trained)
            own = plans.config_built_targets(storage, audit.name, len(audit.targets))
            plan = {key: plans.shadow_jobs(settings, [records(("population",), dataset=audit.dataset)], own)
                    for key in trained}  # fmt: skip
        arch = {"arch": family.base_spec(settings).arch}
        yield from materialize_plan(context, settings, storage, compute, family.models_module(), plan, arch)

    return _models


training_assets = [training_asset(family) for family in FAMILIES.values()]


def materialize_plan(
    context: AssetExecutionContext,
    settings: AuditSettings,
    storage: Storage,
    compute: Compute,
    family: ModuleType,
    plan: dict[str, list[TrainJob]],
    extra: dict[str, Any],
) -> Iterator[MaterializeResult]:
    """Train the jobs of the selected assets of a training multi-asset (those of `plan`) in one pool; yield
    each asset's result."""
    selected = [key.to_user_string() for key in context.selected_asset_keys if key.to_user_string() in plan]
    jobs = [job for key in selected for job in plan[key]]
    trained = iter(train_and_register(context, settings, storage, compute, family, jobs))
    for key in selected:
        results = [next(trained) for _ in plan[key]]
        metadata = results[0] if len(results) == 1 else {"models": MetadataValue.json(results)}
        yield MaterializeResult(asset_key=key, metadata={**metadata, **extra})


def register_audit_models(
    context: AssetExecutionContext, storage: Storage, audit: AuditSpec, family: Family, selected: set[str]
) -> Iterator[MaterializeResult]:
    """Register the checkpoints of an audit of the registry (its targets, null control and references) as
    model versions of the audit, one result per selected training asset."""
    target, null_control, helpers = family.models
    roles = {target: ("target", audit.targets),
             null_control: ("null_control", (audit.null_control,) if audit.null_control else ()),
             helpers: (family.helper_role, audit.references)}  # fmt: skip
    for key in sorted(selected):
        role, checkpoints = roles[key]
        registered = []
        for checkpoint in checkpoints:
            folder, described = stage_checkpoint(storage.root, audit, checkpoint)
            row = {"family": family.name, "arch": described.arch, "role": role, "audit": audit.name,
                   "train_config": json.dumps({"source": checkpoint.path}), "train_dataset": audit.dataset}  # fmt: skip
            staged = folder != Path(checkpoint.path)
            weights = described.weights.relative_to(folder).as_posix()
            version = storage.register_model(folder, sha256_file(described.weights), row, move=staged, weights=weights)
            if staged:
                shutil.rmtree(folder, ignore_errors=True)
            if is_audited(family.name, role):
                add_versions(context.instance, family.name, [version])
            registered.append({"model_version": version, "source": checkpoint.path, "arch": described.arch})
        yield MaterializeResult(asset_key=key, metadata={"models": MetadataValue.json(registered),
                                                         "registered_from": audit.name})  # fmt: skip


def verified_checkpoint(storage: Storage, version: str) -> dict:
    """A version's `models` row, once its checkpoint file's sha256 is the registered one (else a ValueError)."""
    info = storage.repository.model_info(version)
    actual = sha256_file(info["checkpoint_uri"])
    if actual != info["sha256"]:
        raise ValueError(f"{info['checkpoint_uri']}: sha256 {actual} differs from the registered {info['sha256']}")
    return info


def model_checkpoint(family: Family):
    """`<family>/model_checkpoint`, downstream of the family's training assets."""

    @asset(key=version_key(family, "model_checkpoint"), group_name="models",
           partitions_def=VERSION_PARTITIONS[family.name],
           deps=[AssetKey(name) for name in family.trained],
           kinds={"pytorch"})  # fmt: skip
    def _checkpoint(context: AssetExecutionContext, storage: Storage) -> MaterializeResult:
        """One audited version's checkpoint verified against the registered sha256 and its tensors counted (weights
        are loaded by the signal assets, which name the file in any error)."""
        info = verified_checkpoint(storage, context.partition_key)
        n_tensors = checkpoint_tensor_count(info["checkpoint_uri"])
        return MaterializeResult(
            metadata={
                "n_tensors": n_tensors,
                **{k: str(info[k]) for k in ("arch", "role", "audit", "sha256", "checkpoint_uri")},
            }
        )

    return _checkpoint
