"""Data assets: every source read shard by shard, the `records` they merge into, and the audit's roles."""

import json
from pathlib import Path

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
    TableColumn,
    TableSchema,
    asset,
)

from m4i_assets.data.audits import AuditSpec, roles_from_data
from m4i_assets.data.roles import controlled_roles
from m4i_assets.data.sources import SourceSpec, load_registry, partition_key, shard_partition_keys
from m4i_assets.defs.resources import Storage
from m4i_assets.settings import AuditSettings


def schema_of(frame) -> MetadataValue:
    return MetadataValue.table_schema(
        TableSchema(columns=[TableColumn(name, str(dtype)) for name, dtype in frame.schema.items()])
    )


def audit_sources(settings: AuditSettings, storage: Storage) -> list[SourceSpec]:
    """Every source of the audit: the embedded corpora its settings ask for, then the registry's."""
    registered = load_registry(settings.registry_path(storage.root))
    audit = settings.registered_audit(storage.root)
    if audit is not None:  # an audit of the user's data reads the registry's sources only
        if audit.dataset not in [s.name for s in registered]:
            raise ValueError(f"audit {audit.name!r}: dataset {audit.dataset!r} is not in "
                             f"{settings.registry_path(storage.root)}")  # fmt: skip
        return registered
    embedded = [
        SourceSpec(spec.name, "embedded", str(storage.corpus_dir(spec.name)), corpus=spec)
        for spec in settings.corpus_specs()
    ]
    names = [s.name for s in embedded + registered]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must be unique across the embedded corpora and the registry: {names}")
    return embedded + registered


def shard_outputs(storage: Storage, key: str) -> tuple[Path, Path, Path]:
    """The records and rejects Parquet files and the counts JSON of one ingested shard."""
    folder = storage.root / "ingest" / key
    return folder / "records.parquet", folder / "rejects.parquet", folder / "counts.json"


def rows_accounted_for(check_name: str, counts: dict[str, int]) -> AssetCheckResult:
    """The ingestion invariant as a check result: rows in = records + rejects."""
    passed = counts["rows_in"] == counts["records"] + counts["rejects"]
    return AssetCheckResult(check_name=check_name, passed=passed, metadata=counts)


def ingestion_assets(sources: list[SourceSpec]) -> list[AssetsDefinition]:
    """`source_shards`, statically partitioned by `<dataset>/<shard>` (one shard read at a time, in
    parallel runs or a backfill), and `records`, which merges every shard into the warehouse."""
    shards = StaticPartitionsDefinition(shard_partition_keys(sources))

    @asset(
        name="source_shards",
        group_name="data",
        partitions_def=shards,
        kinds={"parquet"},
        check_specs=[AssetCheckSpec("shard_rows_accounted_for", asset="source_shards", blocking=True,
                                    description="rows in = records + rejects, for this shard")],
    )  # fmt: skip
    def source_shards(context: AssetExecutionContext, settings: AuditSettings, storage: Storage) -> MaterializeResult:
        """One shard of one source read and validated (the embedded corpus is generated first): usable rows
        to `records.parquet`, unusable ones with their reason to `rejects.parquet`."""
        by_key = {
            partition_key(s, shard): (s, shard) for s in audit_sources(settings, storage) for shard in s.shard_ids()
        }
        if context.partition_key not in by_key:
            raise ValueError(f"shard {context.partition_key!r} is not in the audit's sources any more: reload the code")
        source, shard = by_key[context.partition_key]
        ingested = source.read(shard)
        records_file, rejects_file, counts_file = shard_outputs(storage, context.partition_key)
        records_file.parent.mkdir(parents=True, exist_ok=True)
        counts_file.unlink(missing_ok=True)  # written last: its presence says the shard's files are complete
        ingested.records.write_parquet(records_file)
        ingested.rejects.write_parquet(rejects_file)
        counts = {"rows_in": ingested.rows_in, "records": ingested.records.height, "rejects": ingested.rejects.height}
        counts_file.write_text(json.dumps(counts))
        return MaterializeResult(
            metadata={
                "dagster/row_count": ingested.records.height,
                **counts,
                "format": source.format,
                "reject_reasons": MetadataValue.json(reasons_of(ingested.rejects)),
            },
            check_results=[rows_accounted_for("shard_rows_accounted_for", counts)],
        )

    @asset(
        name="records",
        group_name="data",
        deps=[source_shards],
        kinds={"duckdb"},
        check_specs=[AssetCheckSpec("rows_accounted_for", asset="records", blocking=True,
                                    description="rows in = records + rejects, over every shard")],
    )  # fmt: skip
    def records(settings: AuditSettings, storage: Storage) -> MaterializeResult:
        """The `records` and `rejects` tables from every ingested shard. A record found again in a later shard
        of the same dataset is a `duplicate` reject; record ids are content hashes, so re-ingesting is idempotent."""
        sources = audit_sources(settings, storage)
        keys = {s.name: [partition_key(s, shard) for shard in s.shard_ids()] for s in sources}
        missing = [k for ks in keys.values() for k in ks if not shard_outputs(storage, k)[2].is_file()]
        if missing:
            raise ValueError(f"shards not ingested yet (materialize source_shards for them first): {missing}")
        rows_in = sum(json.loads(shard_outputs(storage, k)[2].read_text())["rows_in"] for k in sum(keys.values(), []))
        for name, shard_keys in keys.items():
            storage.warehouse.merge_shards(name, [shard_outputs(storage, k)[:2] for k in shard_keys])
        repo = storage.repository
        n_records, reasons = repo.record_count(list(keys)), repo.reject_reasons(list(keys))
        totals = {"rows_in": rows_in, "records": n_records, "rejects": sum(reasons.values())}
        return MaterializeResult(
            metadata={
                "dagster/row_count": n_records,
                "dagster/column_schema": schema_of(repo.records_schema()),
                **totals,
                "shards_per_dataset": MetadataValue.json({name: len(ks) for name, ks in keys.items()}),
                "reject_reasons": MetadataValue.json(reasons),
            },
            check_results=[rows_accounted_for("rows_accounted_for", totals)],
        )

    return [source_shards, records]


def reasons_of(rejects: pl.DataFrame) -> dict[str, int]:
    return dict(sorted(rejects.group_by("reason").len().iter_rows())) if rejects.height else {}


@asset(
    group_name="data",
    deps=["records"],
    kinds={"duckdb"},
    check_specs=[
        AssetCheckSpec(
            "roles_sized_and_disjoint",
            asset="record_roles",
            blocking=True,
            description="each role has its configured size; one role per record",
        )
    ],
)
def record_roles(settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """The audit's roles. A controlled audit: disjoint, seeded member / non-member / known non-member /
    population sets (the second caption domain, when configured, is all population). An audit of the
    registry: each record's role from its column (`m4i_assets.data.audits.roles_from_data`)."""
    audit = settings.registered_audit(storage.root)
    if audit is not None:
        return registered_roles(settings, storage, audit)

    ids_of = storage.repository.record_ids
    main = ids_of(settings.main_dataset())
    shifted, second = settings.shifted_corpus_spec(), settings.second_domain_spec()
    roles = controlled_roles(settings.audit, (settings.main_dataset(), main), settings.role_spec(),
                             (shifted.name, ids_of(shifted.name)) if shifted else None,
                             (second.name, ids_of(second.name)) if second else None)  # fmt: skip
    storage.write("record_roles", roles, audit=settings.audit)
    counts = {r["role"]: r["len"] for r in roles.group_by("role").len().to_dicts()}
    spec = settings.role_spec()
    expected = {"member": spec.n_members, "nonmember": spec.n_nonmembers, "known_nonmember": spec.n_known_nonmembers}
    n_expected = len(main) + (spec.n_nonmembers if shifted else 0) + (len(ids_of(second.name)) if second else 0)
    passed = (
        all(counts.get(k) == v for k, v in expected.items())
        and roles["record_id"].n_unique() == roles.height == n_expected
        and (roles["is_member"] == (roles["role"] == "member")).all()
    )
    return MaterializeResult(
        metadata={"dagster/row_count": roles.height, "dagster/column_schema": schema_of(roles), **counts},
        check_results=[
            AssetCheckResult(
                check_name="roles_sized_and_disjoint",
                passed=bool(passed),
                metadata={**counts, **{f"expected_{k}": v for k, v in expected.items()}},
            )
        ],
    )


def registered_roles(settings: AuditSettings, storage: Storage, audit: AuditSpec) -> MaterializeResult:
    """`record_roles` of a labelled or unlabelled audit, from its dataset's records."""
    records = storage.repository.dataset_records(audit.dataset)
    if not records.height:
        raise ValueError(f"audit {audit.name!r}: dataset {audit.dataset!r} has no records (materialize records)")
    roles = roles_from_data(records, audit, settings.seed).with_columns(audit=pl.lit(audit.name))
    storage.write("record_roles", roles, audit=audit.name)
    counts = {r["role"]: r["len"] for r in roles.group_by("role").len().to_dicts()}
    passed = roles["record_id"].n_unique() == roles.height and set(counts) == set(audit.values)
    return MaterializeResult(
        metadata={
            "dagster/row_count": roles.height,
            "dagster/column_schema": schema_of(roles),
            **counts,
            "kind": audit.kind,
            "column": audit.column,
        },  # fmt: skip
        check_results=[AssetCheckResult(check_name="roles_sized_and_disjoint", passed=bool(passed), metadata=counts)],
    )
