"""Attack assets: each turns stored signals into `membership_scores` rows for one model version.

Every attack is a plain function in `m4i_assets.attacks`; the assets only load signals, call it and
store the scores with ground truth attached.
"""

import numpy as np
import polars as pl
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, MetadataValue, asset

from m4i_assets.attacks import aea, calibrated, csa
from m4i_assets.defs.assets.data import record_roles, schema_of
from m4i_assets.defs.assets.signals import CANDIDATE_ROLES, augmentation_deltas, embeddings, load_signal
from m4i_assets.defs.partitions import model_versions
from m4i_assets.defs.resources import Storage
from m4i_assets.settings import AuditSettings

SCORES_CHECK = "candidates_scored"


def attack_asset(name: str, deps: list):
    """`@asset` for one attack: partitioned by model version, with the candidates-scored check."""
    return asset(
        name=name,
        group_name="attacks",
        partitions_def=model_versions,
        deps=deps,
        kinds={"duckdb"},
        check_specs=[
            AssetCheckSpec(SCORES_CHECK, asset=name, blocking=True,
                           description="every candidate scored once, finite, members and non-members present")
        ],
    )  # fmt: skip


def write_scores(
    storage: Storage, model_version: str, attack: str, record_ids, scores: np.ndarray, asset_key: str | None = None
) -> MaterializeResult:
    """Attach ground truth to candidate scores and replace the (version, attack) rows of `membership_scores`
    (`asset_key` names the asset when a multi-asset writes several attacks)."""
    info = storage.model_info(model_version)
    roles = storage.audit_records(info["audit"], CANDIDATE_ROLES).select("record_id", "is_member")
    frame = (
        pl.DataFrame({"record_id": record_ids, "score": np.asarray(scores, dtype=np.float64)})
        .join(roles, on="record_id", how="inner")
        .with_columns(model_version=pl.lit(model_version), attack=pl.lit(attack), audit=pl.lit(info["audit"]))
    )
    n_members = int(frame["is_member"].sum())
    check = AssetCheckResult(
        asset_key=asset_key,
        check_name=SCORES_CHECK,
        passed=bool(
            np.isfinite(frame["score"].to_numpy()).all()
            and frame.height == roles.height
            and frame["record_id"].n_unique() == frame.height
            and 0 < n_members < frame.height
        ),
        metadata={"scored": frame.height, "candidates": roles.height, "members": n_members},
    )
    storage.write("membership_scores", frame, model_version=model_version, attack=attack)
    return MaterializeResult(
        asset_key=asset_key,
        check_results=[check],
        metadata={
            "dagster/row_count": frame.height,
            "n_members": n_members,
            "mean_score_members": float(frame.filter(pl.col("is_member"))["score"].mean()),
            "mean_score_nonmembers": float(frame.filter(~pl.col("is_member"))["score"].mean()),
        },
    )


def candidate_signals(storage: Storage, model_version: str) -> pl.DataFrame:
    """Embeddings of the candidates (members and non-members) of a model version's audit."""
    info = storage.model_info(model_version)
    emb = load_signal(storage, "embeddings", model_version)
    roles = storage.audit_records(info["audit"], CANDIDATE_ROLES).select("record_id", "is_member")
    return emb.join(roles, on="record_id", how="inner").sort("record_id")


def stack(column: pl.Series) -> np.ndarray:
    return np.stack(column.to_numpy())


@attack_asset("csa_scores", deps=[embeddings])
def csa_scores(context: AssetExecutionContext, storage: Storage) -> MaterializeResult:
    """CSA (Ko et al. 2023, section 3.2): the image-text cosine similarity of each candidate."""
    emb = candidate_signals(storage, context.partition_key)
    scores = csa.csa_scores(stack(emb["image_embedding"]), stack(emb["text_embedding"]))
    return write_scores(storage, context.partition_key, csa.ATTACK_ID, emb["record_id"], scores)


@attack_asset("aea_scores", deps=[augmentation_deltas])
def aea_scores(context: AssetExecutionContext, settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """AEA (Ko et al. 2023, section 3.3): clean CS plus the aggregated augmentation deltas."""
    deltas = load_signal(storage, "augmentation_deltas", context.partition_key)
    wide = deltas.pivot(on="transform", index=["record_id", "cs_clean"], values="delta").sort("record_id")
    transforms = [c for c in wide.columns if c not in ("record_id", "cs_clean")]
    scores = aea.aea_scores(wide["cs_clean"].to_numpy(), wide.select(transforms).to_numpy(), settings.aea_aggregation)
    result = write_scores(storage, context.partition_key, aea.ATTACK_ID, wide["record_id"], scores)
    result.metadata["aggregation"] = settings.aea_aggregation
    result.metadata["transforms"] = len(transforms)
    return result


@asset(group_name="attacks", partitions_def=model_versions, deps=[embeddings], kinds={"duckdb"})
def pseudo_labels(context: AssetExecutionContext, settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """WSA steps 1-2 (Ko et al. 2023, section 3.4): tau = mean + lambda * std of the known non-members'
    CS; candidates at or above tau become pseudo-members. Stores the pseudo-label error rate."""
    from m4i_assets.attacks import wsa

    version = context.partition_key
    info = storage.model_info(version)
    emb = load_signal(storage, "embeddings", version)
    known = storage.audit_records(info["audit"], ("known_nonmember",))
    cs_known = emb.join(known, on="record_id", how="semi")["cosine_similarity"].to_numpy()
    cands = candidate_signals(storage, version)
    labels = wsa.pseudo_label(
        cands["cosine_similarity"].to_numpy(), cs_known, settings.wsa_lambda, settings.wsa_min_pseudo_members
    )
    if labels.rule != "threshold":
        context.log.warning(
            f"tau = {labels.tau:.4f} kept fewer than {settings.wsa_min_pseudo_members} candidates: the top "
            f"{settings.wsa_min_pseudo_members} by CS are the pseudo-members (rule {labels.rule})"
        )
    is_member = cands["is_member"].to_numpy()
    error = labels.error_rate(is_member)
    frame = pl.DataFrame({
        "model_version": version, "record_id": cands["record_id"], "cosine_similarity": cands["cosine_similarity"],
        "tau": labels.tau, "wsa_lambda": settings.wsa_lambda, "rule": labels.rule,
        "is_pseudo_member": labels.is_pseudo_member,
        "is_member": is_member,
    })  # fmt: skip
    storage.write("pseudo_labels", frame, model_version=version)
    return MaterializeResult(metadata={
        "dagster/row_count": frame.height, "dagster/column_schema": schema_of(frame), "tau": labels.tau,
        "n_pseudo_members": int(labels.is_pseudo_member.sum()), "n_known_nonmembers": len(cs_known),
        "pseudo_label_error_rate": error, "rule": labels.rule,
    })  # fmt: skip


@asset(group_name="attacks", partitions_def=model_versions, deps=[pseudo_labels], kinds={"pytorch", "file"})
def wsa_attack_model(context: AssetExecutionContext, settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """WSA step 3: the paper's MLP on concat[f_img, f_txt], pseudo-members vs known non-members,
    saved as safetensors with its sha256 (logged to MLflow with the audit run)."""
    from m4i_assets.attacks import wsa

    version = context.partition_key
    info = storage.model_info(version)
    emb = load_signal(storage, "embeddings", version)
    labels = storage.read("SELECT record_id FROM pseudo_labels WHERE model_version = ? AND is_pseudo_member",
                          [version])  # fmt: skip
    known = storage.audit_records(info["audit"], ("known_nonmember",))
    pos = emb.join(labels, on="record_id", how="semi")
    neg = emb.join(known, on="record_id", how="semi")
    train = pl.concat([pos, neg])
    X = wsa.wsa_features(stack(train["image_embedding"]), stack(train["text_embedding"]))
    y = np.r_[np.ones(pos.height), np.zeros(neg.height)]
    clf = wsa.WsaClassifier(random_state=settings.seed).fit(X, y)
    stored = storage.write_attack_model(version, "wsa.safetensors", clf.to_bytes())
    return MaterializeResult(metadata={
        **stored, "n_pseudo_members": pos.height,
        "n_known_nonmembers": neg.height, "epochs": len(clf.history_),
        "val_loss_history": MetadataValue.json(clf.history_),
    })  # fmt: skip


@attack_asset("wsa_scores", deps=[wsa_attack_model])
def wsa_scores(context: AssetExecutionContext, storage: Storage) -> MaterializeResult:
    """WSA step 4: P(member) of each candidate under the trained attack model."""
    from m4i_assets.attacks import wsa

    version = context.partition_key
    clf = wsa.WsaClassifier.from_bytes(storage.read_attack_model(version, "wsa.safetensors", "wsa_attack_model"))
    cands = candidate_signals(storage, version)
    X = wsa.wsa_features(stack(cands["image_embedding"]), stack(cands["text_embedding"]))
    return write_scores(storage, version, wsa.ATTACK_ID, cands["record_id"], clf.predict_proba(X)[:, 1])


@attack_asset("ref_calibrated_scores", deps=[embeddings])
def ref_calibrated_scores(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage
) -> MaterializeResult:
    """Offline LiRA (Carlini et al. 2022): the target's CS against the CS of the same records under
    reference CLIPs trained without any candidate."""
    version = context.partition_key
    info = storage.model_info(version)
    refs = storage.reference_versions(info["audit"], settings.n_reference_models)
    cands = candidate_signals(storage, version)
    ref_cs = []
    for ref in refs:
        ref_emb = load_signal(storage, "embeddings", ref).select("record_id", "cosine_similarity")
        joined = cands.select("record_id").join(ref_emb, on="record_id", how="left")
        if joined["cosine_similarity"].null_count():
            raise ValueError(f"reference {ref} lacks embeddings for some candidates of {version}")
        ref_cs.append(joined["cosine_similarity"].to_numpy())
    scores = calibrated.lira_offline_scores(cands["cosine_similarity"].to_numpy(), np.stack(ref_cs, axis=1))
    result = write_scores(storage, version, calibrated.ATTACK_ID, cands["record_id"], scores)
    result.metadata["reference_versions"] = MetadataValue.json(refs)
    return result


@attack_asset("blind_baseline_scores", deps=[record_roles])
def blind_baseline_scores(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage
) -> MaterializeResult:
    """Blind baseline (Das et al. 2024): cross-validated P(member) from model-free record features."""
    from m4i_assets.attacks import blind

    version = context.partition_key
    info = storage.model_info(version)
    recs = storage.audit_records(info["audit"], CANDIDATE_ROLES)
    scores = blind.blind_scores(recs["caption"].to_list(), recs["image_uri"].to_list(), recs["is_member"].to_numpy(),
                                n_folds=settings.blind_folds, random_state=settings.seed)  # fmt: skip
    return write_scores(storage, version, blind.ATTACK_ID, recs["record_id"], scores)


attack_assets = [csa_scores, aea_scores, pseudo_labels, wsa_attack_model, wsa_scores, ref_calibrated_scores,
                 blind_baseline_scores]  # fmt: skip
score_assets = [csa_scores, aea_scores, wsa_scores, ref_calibrated_scores, blind_baseline_scores]
