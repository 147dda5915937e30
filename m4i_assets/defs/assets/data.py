"""Data assets: the embedded corpus, the records it ingests into, and the audit's roles."""

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
    """The embedded default corpus: seeded image files plus a JSONL manifest (same seed, same bytes);
    with `shifted_nonmembers`, also the shifted corpus the non-members are drawn from."""
    metadata = {}
    for spec in settings.corpus_specs():
        manifest = corpus_gen.generate(spec, storage.corpus_dir(spec.name))
        metadata[spec.name] = MetadataValue.json({"manifest": str(manifest), **spec.__dict__})
    return MaterializeResult(metadata=metadata)


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
    batches = [
        read_manifest(storage.corpus_dir(spec.name) / "manifest.jsonl", dataset=spec.name)
        for spec in settings.corpus_specs()
    ]
    with storage.connect() as conn:
        for spec, ingested in zip(settings.corpus_specs(), batches):
            replace_rows(conn, "records", ingested.records, dataset=spec.name)
            replace_rows(conn, "rejects", ingested.rejects, source=spec.name)
        storage.refresh_views(conn)
    recs = pl.concat([b.records for b in batches])
    rejects = pl.concat([b.rejects for b in batches])
    rows_in = sum(b.rows_in for b in batches)
    reasons = dict(rejects.group_by("reason").len().iter_rows()) if rejects.height else {}
    counts = {"rows_in": rows_in, "records": recs.height, "rejects": rejects.height}
    return MaterializeResult(
        metadata={
            "dagster/row_count": recs.height,
            "dagster/column_schema": schema_of(recs),
            **counts,
            "reject_reasons": MetadataValue.json(reasons),
        },
        check_results=[
            AssetCheckResult(
                check_name="rows_accounted_for", passed=rows_in == recs.height + rejects.height, metadata=counts
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
    """Disjoint, seeded member / non-member / known non-member / population sets of the audit (the second
    caption domain, when configured, is all population)."""

    def ids_of(spec) -> list[str]:
        return storage.read("SELECT record_id FROM records WHERE dataset = ?", [spec.name])["record_id"].to_list()

    main = ids_of(settings.corpus_spec())
    shifted, second = settings.shifted_corpus_spec(), settings.second_domain_spec()
    roles = assign_roles(main, settings.role_spec(), ids_of(shifted) if shifted else None)
    if second:  # the second caption domain is all population (shadow captioners' data)
        other = pl.DataFrame({"record_id": ids_of(second), "role": "population", "is_member": False})
        roles = pl.concat([roles, other.join(roles, on="record_id", how="anti")]).sort("record_id")
    roles = roles.with_columns(audit=pl.lit(settings.audit))
    with storage.connect() as conn:
        replace_rows(conn, "record_roles", roles, audit=settings.audit)
    counts = {r["role"]: r["len"] for r in roles.group_by("role").len().to_dicts()}
    spec = settings.role_spec()
    expected = {"member": spec.n_members, "nonmember": spec.n_nonmembers, "known_nonmember": spec.n_known_nonmembers}
    n_expected = len(main) + (spec.n_nonmembers if shifted else 0) + (len(ids_of(second)) if second else 0)
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
