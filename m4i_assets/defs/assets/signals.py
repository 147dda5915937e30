"""Signal assets: per (model version, record) quantities every attack shares, as Parquet files."""

import numpy as np
import polars as pl
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from m4i_assets.attacks.csa import cosine_similarity
from m4i_assets.defs.assets.data import schema_of
from m4i_assets.defs.assets.models import model_checkpoint
from m4i_assets.defs.partitions import model_versions
from m4i_assets.defs.resources import Compute, Storage
from m4i_assets.models import clip
from m4i_assets.settings import AuditSettings
from m4i_assets.signals.embeddings import embed_records

# Records every attack scores or calibrates against; the population only trains models.
EMBEDDED_ROLES = ("member", "nonmember", "known_nonmember")


@asset(
    group_name="signals",
    partitions_def=model_versions,
    deps=[model_checkpoint],
    kinds={"pytorch", "parquet"},
    check_specs=[
        AssetCheckSpec(
            "finite_unit_embeddings",
            asset="embeddings",
            blocking=True,
            description="one row per record, NaN-free, expected dimension, unit norm",
        )
    ],
)
def embeddings(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage, compute: Compute
) -> MaterializeResult:
    """L2-normalised image and text embeddings and their cosine similarity, for the audit's records."""
    version = context.partition_key
    info = storage.model_info(version)
    recs = storage.read(
        f"""SELECT r.record_id, r.image_uri, r.caption FROM record_roles x JOIN records r USING (record_id)
            WHERE x.audit = ? AND x.role IN {EMBEDDED_ROLES} ORDER BY r.record_id""",
        [info["audit"]],
    )
    bundle = clip.load_clip(info["arch"], info["checkpoint_uri"], compute.torch_device)
    img, txt = embed_records(
        bundle,
        recs["image_uri"].to_list(),
        recs["caption"].to_list(),
        batch_size=settings.embed_batch_size,
        num_workers=settings.embed_num_workers,
        device=compute.torch_device,
    )
    frame = pl.DataFrame(
        {
            "model_version": [version] * recs.height,
            "record_id": recs["record_id"],
            "image_embedding": img.astype(np.float32),
            "text_embedding": txt.astype(np.float32),
            "cosine_similarity": cosine_similarity(img, txt).astype(np.float64),
        }
    )
    out = storage.signal_dir("embeddings")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{version}.parquet.tmp"
    frame.write_parquet(tmp)
    tmp.replace(out / f"{version}.parquet")  # atomic: readers never see half a file
    with storage.connect() as conn:
        storage.refresh_views(conn)
    norms = np.r_[np.linalg.norm(img, axis=1), np.linalg.norm(txt, axis=1)]
    dim = clip.embed_dim(info["arch"])
    check = AssetCheckResult(
        check_name="finite_unit_embeddings",
        passed=bool(
            np.isfinite(img).all()
            and np.isfinite(txt).all()
            and img.shape == txt.shape == (recs.height, dim)
            and np.allclose(norms, 1.0, atol=1e-3)
        ),
        metadata={
            "rows": recs.height,
            "dim": int(img.shape[1]),
            "expected_dim": int(dim),
            "max_norm_error": float(np.abs(norms - 1).max()) if len(norms) else 0.0,
        },
    )
    return MaterializeResult(
        check_results=[check],
        metadata={
            "dagster/row_count": frame.height,
            "dagster/column_schema": schema_of(frame),
            "embedding_dim": int(img.shape[1]),
            "path": str(out / f"{version}.parquet"),
        },
    )


def load_embeddings(storage: Storage, model_version: str) -> pl.DataFrame:
    """The embeddings Parquet of one model version."""
    path = storage.signal_dir("embeddings") / f"{model_version}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"no embeddings for {model_version}: materialize `embeddings` first ({path})")
    return pl.read_parquet(path)
