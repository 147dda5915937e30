"""Per-version assets: the audited versions of each family (targets, null controls, defended versions) are dynamic
partitions of that family's assets only (`clip_versions`, `captioner_versions`), so no asset is ever offered a
version it cannot audit; each such asset's key is `<family>/<name>`, and one `VersionAsset` entry says how any
family builds it (`version_asset`). Helper models (reference CLIPs, shadow captioners) are no partitions: the
family's helper asset computes, for all of them at once, what its attacks read (`Family.helper_asset`)."""

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DagsterInstance,
    DynamicPartitionsDefinition,
    MaterializeResult,
    asset,
)

from m4i_assets.defs.resources import GPU_STEP, Compute, Storage, Tracking
from m4i_assets.families import FAMILIES, Family
from m4i_assets.settings import AuditSettings

VERSION_PARTITIONS = {name: DynamicPartitionsDefinition(name=f"{name}_versions") for name in FAMILIES}
PER_VERSION = {name for family in FAMILIES.values() for name in family.job_assets()}


def version_key(family: Family | str, name: str) -> AssetKey:
    """The key of a per-version asset of a family: `<family>/<name>` (e.g. `clip/attack_metrics`)."""
    return AssetKey([family if isinstance(family, str) else family.name, name])


def dep_keys(family: Family, names: Iterable[str]) -> list[AssetKey]:
    """What a per-version asset of `family` reads: the family's own per-version assets of these names (those it
    lacks are left out), and the unpartitioned assets (records, roles, models, helpers) by their names."""
    return [version_key(family, n) if n in PER_VERSION else AssetKey(n) for n in names
            if n not in PER_VERSION or n in family.job_assets()]  # fmt: skip


def is_audited(family: str, role: str) -> bool:
    """Whether a version of this role is a partition (audited), not a helper the attacks learn from."""
    return role not in (FAMILIES[family].helper_role, FAMILIES[family].defended_helper_role)


def add_versions(instance: DagsterInstance, family: str, versions: Iterable[str]) -> None:
    """Add audited versions as partitions of their family's assets."""
    versions = list(versions)
    if versions:
        instance.add_dynamic_partitions(VERSION_PARTITIONS[family].name, versions)


@dataclass(frozen=True)
class Step:
    """What the computation of a per-version asset is given: the version and the run's resources and context."""

    version: str
    settings: AuditSettings
    storage: Storage
    compute: Compute
    tracking: Tracking
    context: AssetExecutionContext


@dataclass(frozen=True, eq=False)
class VersionAsset:
    """One per-version asset, for any family whose registry entry names it: `run` computes it for one version,
    `deps` names what it reads (`dep_keys`), `checks` maps each check to (description, blocking); the asset's
    description is `description` or `run`'s docstring."""

    name: str
    run: Callable[[Step], MaterializeResult]
    deps: tuple[str, ...]
    group: str
    kinds: frozenset[str]
    checks: dict[str, tuple[str, bool]] = field(default_factory=dict)
    gpu: bool = False
    description: str | None = None


def version_asset(spec: VersionAsset, family: Family) -> AssetsDefinition:
    """`spec` as the asset `<family>/<name>`, partitioned by the family's audited versions."""
    key = version_key(family, spec.name)

    @asset(
        key=key,
        description=spec.description or inspect.getdoc(spec.run),
        group_name=spec.group,
        partitions_def=VERSION_PARTITIONS[family.name],
        deps=dep_keys(family, spec.deps),
        kinds=set(spec.kinds),
        op_tags=GPU_STEP if spec.gpu else None,
        check_specs=[AssetCheckSpec(name, asset=key, description=text, blocking=blocking)
                     for name, (text, blocking) in spec.checks.items()],
    )  # fmt: skip
    def _asset(
        context: AssetExecutionContext, settings: AuditSettings, storage: Storage, compute: Compute, tracking: Tracking
    ) -> MaterializeResult:
        return spec.run(Step(context.partition_key, settings, storage, compute, tracking, context))

    return _asset
