"""Per-version assets: the audited versions of each family (targets, null controls, defended versions) are dynamic
partitions of that family's assets only (`clip_versions`, `captioner_versions`), so no asset is ever offered a
version it cannot audit; each such asset's key is `<family>/<name>`, and one `VersionAsset` entry says how any
family builds it (`version_asset`). The signals a family computes per record shard (`Family.sharded`) are
partitioned by version x shard (`shard|version` keys, `data.shards`), so one version's embeddings spread over
runs and workers; the assets that read them depend on every shard of their version. Helper models (reference
CLIPs, shadow captioners) are no partitions: the family's helper asset computes, for all of them at once, what
its attacks read (`Family.helper_asset`)."""

import inspect
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dagster import (
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    BetaWarning,
    DagsterInstance,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    MultiToSingleDimensionPartitionMapping,
    PartitionsDefinition,
    StaticPartitionsDefinition,
    asset,
)

from m4i_assets.data.shards import WHOLE, Shard, shard_keys
from m4i_assets.defs.resources import GPU_STEP, Compute, Storage, Tracking
from m4i_assets.families import FAMILIES, Family
from m4i_assets.settings import AuditSettings

with warnings.catch_warnings():  # beta since 1.3 and stable in use: said once here, not at every load
    warnings.simplefilter("ignore", BetaWarning)
    EVERY_SHARD = MultiToSingleDimensionPartitionMapping(partition_dimension_name="version")
VERSION_PARTITIONS = {name: DynamicPartitionsDefinition(name=f"{name}_versions") for name in FAMILIES}
# A dependency on whatever trains or registers the family's audited versions (`Family.trained`): what a sharded
# signal reads, since it verifies the checkpoint it loads itself (one partitioning per run: no run of the
# per-version `model_checkpoint` asset must come before the shards).
TRAINED = "trained"
PER_VERSION = {name for family in FAMILIES.values() for name in family.job_assets()}


def version_key(family: Family | str, name: str) -> AssetKey:
    """The key of a per-version asset of a family: `<family>/<name>` (e.g. `clip/attack_metrics`)."""
    return AssetKey([family if isinstance(family, str) else family.name, name])


def shard_partitions(family: Family, shards: int) -> MultiPartitionsDefinition:
    """The partitions of a family's sharded signals: its audited versions x `shards` record shards."""
    return MultiPartitionsDefinition(
        {"version": VERSION_PARTITIONS[family.name], "shard": StaticPartitionsDefinition(shard_keys(shards))}
    )


def shard_partition_key(version: str, shard: Shard) -> str:
    """The partition key of one shard of a version's sharded signals (`<shard>|<version>`)."""
    return str(MultiPartitionKey({"version": version, "shard": shard.key}))


def dep_keys(family: Family, names: Iterable[str], sharded: bool = False) -> list[AssetDep]:
    """What a per-version asset of `family` reads: the family's own per-version assets of these names (those it
    lacks are left out; a sharded one by every shard of the version, unless the reader is itself sharded and
    reads its own shard), the family's training assets by `TRAINED`, and the unpartitioned assets (records, roles,
    models, helpers) by their names."""
    deps = []
    for name in names:
        if name == TRAINED:
            deps += [AssetDep(AssetKey(n)) for n in family.trained]
        elif name not in PER_VERSION:
            deps.append(AssetDep(AssetKey(name)))
        elif name in family.job_assets():
            every_shard = name in family.sharded and not sharded
            deps.append(AssetDep(version_key(family, name), partition_mapping=EVERY_SHARD if every_shard else None))
    return deps


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
    shard: Shard = WHOLE


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


def version_asset(spec: VersionAsset, family: Family, shards: int = 1) -> AssetsDefinition:
    """`spec` as the asset `<family>/<name>`, partitioned by the family's audited versions, and by `shards`
    record shards too when the family computes it per shard."""
    key = version_key(family, spec.name)
    sharded = spec.name in family.sharded
    partitions: PartitionsDefinition = shard_partitions(family, shards) if sharded else VERSION_PARTITIONS[family.name]

    @asset(
        key=key,
        description=spec.description or inspect.getdoc(spec.run),
        group_name=spec.group,
        partitions_def=partitions,
        deps=dep_keys(family, spec.deps, sharded),
        kinds=set(spec.kinds),
        op_tags=GPU_STEP if spec.gpu else None,
        check_specs=[AssetCheckSpec(name, asset=key, description=text, blocking=blocking)
                     for name, (text, blocking) in spec.checks.items()],
    )  # fmt: skip
    def _asset(
        context: AssetExecutionContext, settings: AuditSettings, storage: Storage, compute: Compute, tracking: Tracking
    ) -> MaterializeResult:
        version, shard = context.partition_key, WHOLE
        if sharded:
            keys = context.partition_key.keys_by_dimension
            version, shard = keys["version"], Shard(int(keys["shard"]), shards)
        return spec.run(Step(version, settings, storage, compute, tracking, context, shard))

    return _asset
