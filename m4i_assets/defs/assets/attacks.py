"""Attack assets: each turns stored signals into `membership_scores` rows for one model version."""

import numpy as np
import polars as pl
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from m4i_assets.attacks import csa
from m4i_assets.defs.assets.signals import embeddings, load_embeddings
from m4i_assets.defs.partitions import model_versions
from m4i_assets.defs.resources import Storage
from m4i_assets.storage.warehouse import replace_rows

SCORES_CHECK = "candidates_scored"


def scores_check_spec(asset_name: str) -> AssetCheckSpec:
    return AssetCheckSpec(
        SCORES_CHECK,
        asset=asset_name,
        blocking=True,
        description="every candidate scored once, finite, members and non-members present",
    )


def write_scores(
    storage: Storage, model_version: str, attack: str, record_ids, scores: np.ndarray
) -> MaterializeResult:
    """Attach ground truth to candidate scores and replace the (version, attack) rows of `membership_scores`."""
    info = storage.model_info(model_version)
    roles = storage.read(
        "SELECT record_id, is_member FROM record_roles WHERE audit = ? AND role IN ('member', 'nonmember')",
        [info["audit"]],
    )
    frame = (
        pl.DataFrame({"record_id": record_ids, "score": np.asarray(scores, dtype=np.float64)})
        .join(roles, on="record_id", how="inner")
        .with_columns(model_version=pl.lit(model_version), attack=pl.lit(attack), audit=pl.lit(info["audit"]))
    )
    n_members = int(frame["is_member"].sum())
    check = AssetCheckResult(
        check_name=SCORES_CHECK,
        passed=bool(
            np.isfinite(frame["score"].to_numpy()).all()
            and frame.height == roles.height
            and frame["record_id"].n_unique() == frame.height
            and 0 < n_members < frame.height
        ),
        metadata={"scored": frame.height, "candidates": roles.height, "members": n_members},
    )
    with storage.connect() as conn:
        replace_rows(conn, "membership_scores", frame, model_version=model_version, attack=attack)
    return MaterializeResult(
        check_results=[check],
        metadata={
            "dagster/row_count": frame.height,
            "n_members": n_members,
            "mean_score_members": float(frame.filter(pl.col("is_member"))["score"].mean()),
            "mean_score_nonmembers": float(frame.filter(~pl.col("is_member"))["score"].mean()),
        },
    )


@asset(
    group_name="attacks",
    partitions_def=model_versions,
    deps=[embeddings],
    kinds={"duckdb"},
    check_specs=[scores_check_spec("csa_scores")],
)
def csa_scores(context: AssetExecutionContext, storage: Storage) -> MaterializeResult:
    """CSA (Ko et al. 2023, section 3.2): the image-text cosine similarity of each candidate."""
    emb = load_embeddings(storage, context.partition_key)
    scores = csa.csa_scores(np.stack(emb["image_embedding"].to_numpy()), np.stack(emb["text_embedding"].to_numpy()))
    return write_scores(storage, context.partition_key, csa.ATTACK_ID, emb["record_id"], scores)


attack_assets = [csa_scores]
