"""Signal assets: per (model version, record) quantities every attack shares, as Parquet files. Each is generated
per family (`<family>/<name>`, partitioned by the family's audited versions); the helper models' signals are
computed by the family's helper asset (`reference_embeddings` here) with the same functions."""

from pathlib import Path

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    MaterializeResult,
    MetadataValue,
    asset,
)

from m4i_assets.attacks.adaptive import caption_variant_keys, image_variant_keys
from m4i_assets.attacks.csa import cosine_similarity
from m4i_assets.data.shards import WHOLE, Shard
from m4i_assets.defs.assets.data import schema_of
from m4i_assets.defs.assets.models import verified_checkpoint
from m4i_assets.defs.partitions import TRAINED, Step, VersionAsset
from m4i_assets.defs.resources import GPU_STEP, Compute, Storage, Tracking
from m4i_assets.families import Family
from m4i_assets.scoring import release_of
from m4i_assets.settings import AuditSettings
from m4i_assets.storage.repository import CANDIDATE_ROLES

# Records every attack scores or calibrates against; the population only trains models.
EMBEDDED_ROLES = (*CANDIDATE_ROLES, "known_nonmember")


def embed_version(step: Step) -> MaterializeResult:
    """L2-normalised image and text embeddings and their cosine similarity, for the audit's records (those of the
    step's record shard) under the version's checkpoint (its sha256 verified), as the model version releases them
    (a release-time defense perturbs them here, so every attack sees it)."""
    from m4i_assets.models import clip
    from m4i_assets.signals.embeddings import embed_records

    version, settings, storage, compute = step.version, step.settings, step.storage, step.compute
    repo = storage.repository
    info = verified_checkpoint(storage, version)
    recs = repo.audit_records(info["audit"], EMBEDDED_ROLES)
    recs = recs[step.shard.rows(recs.height, settings.embed_batch_size)]
    bundle = clip.load_clip(info["checkpoint_uri"], info["arch"], compute.torch_device)
    img, txt = embed_records(
        bundle,
        recs["image_uri"].to_list(),
        recs["caption"].to_list(),
        batch_size=settings.embed_batch_size,
        device=compute.torch_device,
    )
    release, ids = release_of(info, settings.seed), recs["record_id"].to_list()
    img = release.embeddings(img, ids, "image", image_variant_keys(recs["image_uri"], release.queries))
    txt = release.embeddings(txt, ids, "text", caption_variant_keys(recs["caption"], release.queries))
    frame = pl.DataFrame(
        {
            "model_version": [version] * recs.height,
            "record_id": recs["record_id"],
            "image_embedding": img.astype(np.float32),
            "text_embedding": txt.astype(np.float32),
            "cosine_similarity": release.similarities(cosine_similarity(img, txt).astype(np.float64)),
        }
    )
    path = write_signal(storage, "embeddings", version, frame, step.shard)
    norms = np.r_[np.linalg.norm(img, axis=1), np.linalg.norm(txt, axis=1)]
    dim = bundle.embed_dim
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
            "path": str(path),
        },
    )


def helper_versions(storage: Storage, settings: AuditSettings, family: Family) -> list[str]:
    """The helper versions the settings' audit learns from (`Family.helper_versions`): an audit of the registry's
    own references (all of them), a controlled audit's `n_reference_models`, and those trained with a defense."""
    return family.helper_versions(storage, settings.audit, settings.reference_count(storage.root))


def reference_embeddings(family: Family):
    """The helper asset of a family whose helpers are reference CLIPs (`Family.helper_asset`)."""
    key = AssetKey(family.helper_asset)

    @asset(
        key=key,
        op_tags=GPU_STEP,
        group_name="signals",
        deps=[AssetKey(family.models[2]), AssetKey(family.defended)],
        kinds={"pytorch", "parquet"},
        check_specs=[AssetCheckSpec("finite_unit_embeddings", asset=key, blocking=True,
                                    description="every reference model's embeddings NaN-free, unit norm")],
    )  # fmt: skip
    def _reference_embeddings(
        context: AssetExecutionContext, settings: AuditSettings, storage: Storage, compute: Compute, tracking: Tracking
    ) -> MaterializeResult:
        """The embeddings of every reference CLIP of the audit (and of those trained with a defense, for the
        adaptive attacker), which the calibrated attacks (offline LiRA, RMIA) and the blind baseline's
        target-independent features read: one Parquet file per reference version, as an audited version's."""
        versions = helper_versions(storage, settings, family)
        checks = []
        rows = 0
        for version in versions:
            context.log.info(f"embedding the audit's records with reference {version}")
            result = embed_version(Step(version, settings, storage, compute, tracking, context))
            checks.append(result.check_results[0])
            rows += result.metadata["dagster/row_count"]
        return MaterializeResult(
            metadata={"reference_versions": MetadataValue.json(versions), "dagster/row_count": rows},
            check_results=[AssetCheckResult(
                check_name="finite_unit_embeddings", passed=all(c.passed for c in checks),
                metadata={"per_version": MetadataValue.json({v: c.passed for v, c in zip(versions, checks)})})],
        )  # fmt: skip

    return _reference_embeddings


def write_signal(storage: Storage, signal: str, model_version: str, frame: pl.DataFrame, shard: Shard = WHOLE) -> Path:
    """Write one model version's signal (one record shard of it) as Parquet, replacing its file atomically
    (`signals/<signal>/`)."""
    return storage.warehouse.write_signal(signal, model_version, frame, shard)


def load_signal(storage: Storage, signal: str, model_version: str, shard: Shard | None = None) -> pl.DataFrame:
    """One model version's signal: every shard of it, or one (`Repository.signal`)."""
    return storage.repository.signal(signal, model_version, shard)


def augment_version(step: Step) -> MaterializeResult:
    """CS(x, t), CS(T_k(x), t) and their delta for every candidate and transform (Ko et al. 2023,
    section 3.3), of the step's record shard. Text embeddings and clean CS come from that shard of
    `embeddings`; only images are re-encoded."""
    from m4i_assets.models import clip
    from m4i_assets.signals.augmentations import augmented_image_embeddings, transform_registry

    version, settings, storage, compute = step.version, step.settings, step.storage, step.compute
    repo = storage.repository
    info = verified_checkpoint(storage, version)
    cands = repo.audit_records(info["audit"], EMBEDDED_ROLES).select("record_id", "image_uri")
    emb = load_signal(storage, "embeddings", version, step.shard).join(cands, on="record_id").sort("record_id")
    bundle = clip.load_clip(info["checkpoint_uri"], info["arch"], compute.torch_device)
    transforms = transform_registry(settings.seed)
    augmented = augmented_image_embeddings(bundle, emb["image_uri"].to_list(), transforms, settings.embed_batch_size,
                                           compute.torch_device)  # fmt: skip
    txt = np.stack(emb["text_embedding"].to_numpy())
    cs_clean = emb["cosine_similarity"].to_numpy()
    frames = []
    release, ids = release_of(info, settings.seed), emb["record_id"].to_list()
    img_variants = image_variant_keys(emb["image_uri"], release.queries)
    for name, img in augmented.items():  # an augmented query is released like any other (keyed by transform)
        img = release.embeddings(img, [f"{i}/{name}" for i in ids], "image",
                                 [[f"{v}/{name}" for v in keys] for keys in img_variants])  # fmt: skip
        cs_aug = release.similarities(cosine_similarity(img, txt))
        frames.append(pl.DataFrame({
            "model_version": version, "record_id": emb["record_id"], "transform": name,
            "cs_clean": cs_clean, "cs_augmented": cs_aug, "delta": cs_clean - cs_aug,
        }))  # fmt: skip
    frame = pl.concat(frames)
    path = write_signal(storage, "augmentation_deltas", version, frame, step.shard)
    check = AssetCheckResult(
        check_name="finite_deltas",
        passed=bool(frame.height == emb.height * len(transforms) and len(transforms) >= 8
                    and np.isfinite(frame["delta"].to_numpy()).all()),
        metadata={"rows": frame.height, "transforms": len(transforms)},
    )  # fmt: skip
    mean_delta = frame.group_by("transform").agg(pl.col("delta").mean()).sort("transform")
    return MaterializeResult(check_results=[check], metadata={
        "dagster/row_count": frame.height, "dagster/column_schema": schema_of(frame), "path": str(path),
        "mean_delta_by_transform": MetadataValue.json(dict(mean_delta.iter_rows())),
    })  # fmt: skip


SIGNALS = frozenset({"pytorch", "parquet"})
VERSION_ASSETS = [
    VersionAsset("embeddings", embed_version, (TRAINED,), "signals", SIGNALS, gpu=True,
                 checks={"finite_unit_embeddings": ("one row per record, NaN-free, expected dimension, unit norm",
                                                    True)}),
    VersionAsset("augmentation_deltas", augment_version, ("embeddings",), "signals", SIGNALS, gpu=True,
                 checks={"finite_deltas": ("one row per (candidate or known non-member, transform), at least eight "
                                           "transforms, finite", True)}),
]  # fmt: skip
