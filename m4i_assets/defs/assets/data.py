"""Data assets: the embedded corpus, the records it ingests into, and the audit's roles."""

import json

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
)

from m4i_assets.data import corpus as corpus_gen
from m4i_assets.data.manifest import read_manifest
from m4i_assets.data.roles import assign_roles
from m4i_assets.defs.resources import Storage
from m4i_assets.settings import AuditSettings
from m4i_assets.storage.warehouse import replace_rows


def schema_of(frame) -> MetadataValue:
    return MetadataValue.table_schema(
        TableSchema(columns=[TableColumn(name, str(dtype)) for name, dtype in frame.schema.items()])
    )


@asset(group_name="data", kinds={"python", "file"})
def corpus(settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """The embedded default corpus: seeded image files plus a JSONL manifest (same seed, same bytes)."""
    spec = settings.corpus_spec()
    manifest = corpus_gen.generate(spec, storage.corpus_dir(spec.name))
    return MaterializeResult(
        metadata={"manifest": str(manifest), "n_records": spec.n_records, "spec": json.dumps(spec.__dict__)}
    )


@asset(
    group_name="data",
    deps=[corpus],
    kinds={"duckdb"},
    check_specs=[
        AssetCheckSpec("rows_accounted_for", asset="records", blocking=True, description="rows in = records + rejects")
    ],
)
def records(settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """The `records` table, read through the manifest reader; unusable rows go to `rejects`."""
    spec = settings.corpus_spec()
    ingested = read_manifest(storage.corpus_dir(spec.name) / "manifest.jsonl", dataset=spec.name)
    with storage.connect() as conn:
        replace_rows(conn, "records", ingested.records, dataset=spec.name)
        replace_rows(conn, "rejects", ingested.rejects, source=spec.name)
        storage.refresh_views(conn)
    reasons = ingested.rejects.group_by("reason").len().to_dicts() if ingested.rejects.height else []
    return MaterializeResult(
        metadata={
            "dagster/row_count": ingested.records.height,
            "dagster/column_schema": schema_of(ingested.records),
            "rows_in": ingested.rows_in,
            "rejects": ingested.rejects.height,
            "reject_reasons": json.dumps(reasons),
        },
        check_results=[
            AssetCheckResult(
                check_name="rows_accounted_for",
                passed=ingested.rows_in == ingested.records.height + ingested.rejects.height,
                metadata={
                    "rows_in": ingested.rows_in,
                    "records": ingested.records.height,
                    "rejects": ingested.rejects.height,
                },
            )
        ],
    )


@asset(
    group_name="data",
    deps=[records],
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
    """Disjoint, seeded member / non-member / known non-member / population sets of the audit."""
    ids = storage.read("SELECT record_id FROM records WHERE dataset = ?", [settings.corpus_spec().name])
    roles = assign_roles(ids["record_id"].to_list(), settings.role_spec()).with_columns(audit=pl.lit(settings.audit))
    with storage.connect() as conn:
        replace_rows(conn, "record_roles", roles, audit=settings.audit)
    counts = {r["role"]: r["len"] for r in roles.group_by("role").len().to_dicts()}
    spec = settings.role_spec()
    expected = {"member": spec.n_members, "nonmember": spec.n_nonmembers, "known_nonmember": spec.n_known_nonmembers}
    passed = (
        all(counts.get(k) == v for k, v in expected.items())
        and roles["record_id"].n_unique() == roles.height == ids.height
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
