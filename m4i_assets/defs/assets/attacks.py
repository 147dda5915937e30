"""Attack assets: each turns stored signals into `membership_scores` rows for one model version.

Every attack is a plain function in `m4i_assets.attacks`; the assets only load signals, call it and
store the scores with ground truth attached.
"""

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

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
    storage: Storage, model_version: str, attack: str, record_ids, scores: np.ndarray, asset_key: str | None = None,
    known: tuple | None = None,
) -> MaterializeResult:
    """Attach ground truth to candidate scores and replace the (version, attack) rows of `membership_scores`
    (`asset_key` names the asset when a multi-asset writes several attacks); `known` (record ids, scores) are
    the attack's scores of the known non-members, for `known_nonmember_scores` (None: it has none)."""
    info = storage.model_info(model_version)
    roles = storage.audit_records(info["audit"], CANDIDATE_ROLES).select("record_id", "is_member")
    frame = (
        pl.DataFrame({"record_id": record_ids, "score": np.asarray(scores, dtype=np.float64)})
        .join(roles, on="record_id", how="inner")
        .with_columns(model_version=pl.lit(model_version), attack=pl.lit(attack), audit=pl.lit(info["audit"]))
    )
    n_members = int(frame["is_member"].sum())
    labelled = frame["is_member"].null_count() == 0  # an unlabelled audit's candidates have no ground truth
    check = AssetCheckResult(
        asset_key=asset_key,
        check_name=SCORES_CHECK,
        passed=bool(
            np.isfinite(frame["score"].to_numpy()).all()
            and frame.height == roles.height
            and frame["record_id"].n_unique() == frame.height
            and (0 < n_members < frame.height if labelled else frame["is_member"].null_count() == frame.height)
        ),
        metadata={"scored": frame.height, "candidates": roles.height, "members": n_members},
    )
    known_frame = pl.DataFrame(
        {"record_id": [] if known is None else known[0],
         "score": np.asarray([] if known is None else known[1], dtype=np.float64)},
        schema={"record_id": pl.String, "score": pl.Float64},
    ).with_columns(model_version=pl.lit(model_version), attack=pl.lit(attack), audit=pl.lit(info["audit"]))  # fmt: skip
    storage.write("membership_scores", frame, model_version=model_version, attack=attack)
    storage.write("known_nonmember_scores", known_frame, model_version=model_version, attack=attack)
    return MaterializeResult(
        asset_key=asset_key,
        check_results=[check],
        metadata={
            "dagster/row_count": frame.height,
            "n_members": n_members,
            "n_known_nonmembers_scored": known_frame.height,
            **(
                {
                    "mean_score_members": float(frame.filter(pl.col("is_member"))["score"].mean()),
                    "mean_score_nonmembers": float(frame.filter(~pl.col("is_member"))["score"].mean()),
                }
                if labelled
                else {"mean_score_candidates": float(frame["score"].mean())}
            ),  # fmt: skip
        },
    )


def interface_skip(storage: Storage, model_version: str, attack: str) -> str | None:
    """Why `attack` cannot run against this version's release interface (`defenses.release.interface_of`: e.g.
    WSA's MLP needs embeddings, a similarity-rounding release gives similarities only); None when it can."""
    from m4i_assets.defenses.release import attack_skip_reason, interface_of

    info = storage.model_info(model_version)
    return attack_skip_reason(attack, interface_of(info["family"], info.get("defense")))


def skipped_scores(
    storage: Storage, model_version: str, attack: str, reason: str, asset_key: str | None = None
) -> MaterializeResult:
    """An attack the version's release rules out: no scores (any earlier ones removed), the candidates-scored
    check failed at WARN severity with the reason (it does not block the rest of the audit); `asset_key` as
    for `write_scores`."""
    for table in ("membership_scores", "known_nonmember_scores"):
        storage.write(table, pl.DataFrame(schema={"record_id": pl.String, "score": pl.Float64}),
                      model_version=model_version, attack=attack)  # fmt: skip
    check = AssetCheckResult(asset_key=asset_key, check_name=SCORES_CHECK, passed=False,
                             severity=AssetCheckSeverity.WARN, metadata={"skipped": reason})  # fmt: skip
    return MaterializeResult(asset_key=asset_key, check_results=[check],
                             metadata={"dagster/row_count": 0, "skipped": reason})  # fmt: skip


def references_of(storage: Storage, info: dict, n: int) -> list[str]:
    """The reference CLIPs a version's calibrated attacks calibrate against: those trained with its defense for an
    adaptive attacker's twin of a training-time defense (`defense_facts.references`), else the audit's `n`."""
    import json

    stored = json.loads(info.get("defense_facts") or "{}").get("references")
    return sorted(stored) if stored else storage.reference_versions(info["audit"], n)


def candidate_signals(storage: Storage, model_version: str, roles: tuple[str, ...] = CANDIDATE_ROLES) -> pl.DataFrame:
    """Embeddings of the records of `roles` (default: the candidates) of a model version's audit, by record id."""
    info = storage.model_info(model_version)
    emb = load_signal(storage, "embeddings", model_version)
    records = storage.audit_records(info["audit"], roles).select("record_id", "is_member")
    return emb.join(records, on="record_id", how="inner").sort("record_id")


def known_signals(storage: Storage, model_version: str) -> pl.DataFrame:
    """Embeddings of the known non-members of a model version's audit, by record id."""
    return candidate_signals(storage, model_version, ("known_nonmember",))


def stack(column: pl.Series) -> np.ndarray:
    return np.stack(column.to_numpy())


def wide_deltas(storage: Storage, model_version: str, record_ids: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(clean CS, per-transform deltas (n, K)) of these records, in their order, transforms by name."""
    deltas = load_signal(storage, "augmentation_deltas", model_version)
    wide = deltas.pivot(on="transform", index=["record_id", "cs_clean"], values="delta")
    wide = pl.DataFrame({"record_id": record_ids}).join(wide, on="record_id", how="left")
    transforms = sorted(c for c in wide.columns if c not in ("record_id", "cs_clean"))
    if wide["cs_clean"].null_count():
        raise ValueError(f"augmentation_deltas of {model_version} lack some records: materialize it again")
    return wide["cs_clean"].to_numpy(), wide.select(transforms).to_numpy()


@attack_asset("csa_scores", deps=[embeddings])
def csa_scores(context: AssetExecutionContext, storage: Storage) -> MaterializeResult:
    """CSA (Ko et al. 2023, section 3.2): the image-text cosine similarity of each candidate (and known
    non-member)."""
    version = context.partition_key
    emb, known = candidate_signals(storage, version), known_signals(storage, version)
    return write_scores(storage, version, csa.ATTACK_ID, emb["record_id"], emb["cosine_similarity"].to_numpy(),
                        known=(known["record_id"], known["cosine_similarity"].to_numpy()))  # fmt: skip


@attack_asset("aea_scores", deps=[augmentation_deltas])
def aea_scores(context: AssetExecutionContext, settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """AEA (Ko et al. 2023, section 3.3): clean CS and the augmentation deltas, aggregated on the known
    non-members' scale (`settings.aea_aggregation`)."""
    version = context.partition_key
    cands, known = candidate_signals(storage, version), known_signals(storage, version)
    cs, deltas = wide_deltas(storage, version, cands["record_id"])
    cs_known, deltas_known = wide_deltas(storage, version, known["record_id"])
    agg = settings.aea_aggregation
    scores = aea.aea_scores(cs, deltas, agg, cs_known, deltas_known)
    known_scores = aea.aea_scores(cs_known, deltas_known, agg, cs_known, deltas_known)
    result = write_scores(storage, version, aea.ATTACK_ID, cands["record_id"], scores,
                          known=(known["record_id"], known_scores))  # fmt: skip
    result.metadata["aggregation"] = agg
    result.metadata["transforms"] = deltas.shape[1]
    return result


def clip_log_probs(storage: Storage, version: str, settings: AuditSettings, cands: pl.DataFrame,
                   known: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, float]:  # fmt: skip
    """`clip_loss` log-probabilities of the candidates and (each against the others) the known non-members,
    under a CLIP version's released embeddings (rows in the order of `cands` / `known`), and the logit scale."""
    from m4i_assets.attacks import clip_loss
    from m4i_assets.defs.assets.models import release_of

    info = storage.model_info(version)
    scale = settings.clip_loss_logit_scale
    if scale <= 0:
        from m4i_assets.models import clip

        scale = float(clip.load_clip(info["checkpoint_uri"], info["arch"], "cpu").model.logit_scale.detach().exp())
    emb = load_signal(storage, "embeddings", version)
    c = cands.select("record_id").join(emb, on="record_id", how="left")
    k = known.select("record_id").join(emb, on="record_id", how="left")
    if c["image_embedding"].null_count() or k["image_embedding"].null_count():
        raise ValueError(f"{version} lacks embeddings for some records of its audit: materialize embeddings")
    release = release_of(info, settings.seed).similarities
    img, txt, kimg, ktxt = (stack(f[col]) for f in (c, k) for col in ("image_embedding", "text_embedding"))
    lp = clip_loss.clip_loss_scores(img, txt, kimg, ktxt, scale, release)
    return lp, clip_loss.self_excluded_log_probs(kimg, ktxt, scale, release), scale


@attack_asset("clip_loss_scores", deps=[embeddings])
def clip_loss_scores(context: AssetExecutionContext, settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """`clip_loss` (ATTACKS.md section 6): the InfoNCE log-probability of each candidate's matched pair
    against the known non-members' captions and images, both directions, at the model's logit scale."""
    from m4i_assets.attacks import clip_loss

    version = context.partition_key
    cands, known = candidate_signals(storage, version), known_signals(storage, version)
    lp, lp_known, scale = clip_log_probs(storage, version, settings, cands, known)
    result = write_scores(storage, version, clip_loss.ATTACK_ID, cands["record_id"], lp,
                          known=(known["record_id"], lp_known))  # fmt: skip
    result.metadata["logit_scale"] = scale
    result.metadata["n_negatives"] = known.height
    return result


@attack_asset("rmia_scores", deps=[embeddings])
def rmia_scores(context: AssetExecutionContext, settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """RMIA (Zarifzadeh et al. 2024), offline: the `clip_loss` probability's ratio to the reference CLIPs',
    compared with the same ratio of the known non-members (the population z)."""
    from m4i_assets.attacks import rmia

    version = context.partition_key
    info = storage.model_info(version)
    refs = references_of(storage, info, settings.n_reference_models)
    cands, known = candidate_signals(storage, version), known_signals(storage, version)
    lp, lp_known, _ = clip_log_probs(storage, version, settings, cands, known)
    ref_lp = [clip_log_probs(storage, ref, settings, cands, known)[:2] for ref in refs]
    p_ref = np.exp(np.stack([r[0] for r in ref_lp], axis=1))
    p_ref_known = np.exp(np.stack([r[1] for r in ref_lp], axis=1))
    scores = rmia.rmia_scores(np.exp(lp), p_ref, np.exp(lp_known), p_ref_known, settings.rmia_a)
    known_scores = rmia.rmia_scores(np.exp(lp_known), p_ref_known, np.exp(lp_known), p_ref_known, settings.rmia_a)
    result = write_scores(storage, version, rmia.ATTACK_ID, cands["record_id"], scores,
                          known=(known["record_id"], known_scores))  # fmt: skip
    result.metadata["reference_versions"] = MetadataValue.json(refs)
    result.metadata["a"] = settings.rmia_a
    return result


def wsa_inputs(storage: Storage, version: str, settings: AuditSettings) -> tuple[pl.DataFrame, pl.DataFrame,
                                                                                 np.ndarray, np.ndarray]:  # fmt: skip
    """Candidates, known non-members and their WSA features (`settings.wsa_features`)."""
    from m4i_assets.attacks import wsa

    cands, known = candidate_signals(storage, version), known_signals(storage, version)
    kinds = tuple(settings.wsa_features)
    X = []
    for frame in (cands, known):
        deltas = wide_deltas(storage, version, frame["record_id"])[1] if "deltas" in kinds else None
        X.append(wsa.wsa_features(stack(frame["image_embedding"]), stack(frame["text_embedding"]), kinds, deltas))
    return cands, known, X[0], X[1]


@asset(group_name="attacks", partitions_def=model_versions, deps=[embeddings], kinds={"duckdb"})
def pseudo_labels(context: AssetExecutionContext, settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """WSA steps 1-2 (Ko et al. 2023, section 3.4): tau from the known non-members' CS alone (their
    (1 - alpha) quantile by default); candidates at or above tau become pseudo-members; each candidate's
    cross-fitting fold. Stores the pseudo-label error rates."""
    from m4i_assets.attacks import wsa

    version = context.partition_key
    cands, known = candidate_signals(storage, version), known_signals(storage, version)
    cs_known = known["cosine_similarity"].to_numpy()
    labels = wsa.pseudo_label(cands["cosine_similarity"].to_numpy(), cs_known, settings.wsa_tau_rule,
                              settings.wsa_alpha, settings.wsa_lambda, settings.wsa_min_pseudo_members)  # fmt: skip
    if labels.rule == "top_k":
        context.log.warning(
            f"tau = {labels.tau:.4f} kept fewer than {settings.wsa_min_pseudo_members} candidates: the top "
            f"{settings.wsa_min_pseudo_members} by CS are the pseudo-members (rule {labels.rule})"
        )
    is_member = cands["is_member"].to_numpy()
    labelled = cands["is_member"].null_count() == 0  # an unlabelled audit's candidates have no ground truth
    is_known = is_member.astype(bool) if labelled else None
    frame = pl.DataFrame({
        "model_version": version, "record_id": cands["record_id"], "cosine_similarity": cands["cosine_similarity"],
        "tau": labels.tau, "wsa_lambda": settings.wsa_lambda, "wsa_alpha": settings.wsa_alpha, "rule": labels.rule,
        "is_pseudo_member": labels.is_pseudo_member, "is_member": is_member,
        "fold": wsa.folds_of(cands.height, settings.wsa_folds, settings.seed),
    })  # fmt: skip
    storage.write("pseudo_labels", frame, model_version=version)
    return MaterializeResult(metadata={
        "dagster/row_count": frame.height, "dagster/column_schema": schema_of(frame), "tau": labels.tau,
        "n_pseudo_members": int(labels.is_pseudo_member.sum()), "n_known_nonmembers": len(cs_known),
        "pseudo_label_error_rate_over_training_set":
            labels.training_set_error_rate(is_known, len(cs_known)) if labelled else float("nan"),
        "nonmember_share_of_pseudo_members": labels.error_rate(is_known) if labelled else float("nan"),
        "rule": labels.rule,
        "folds": settings.wsa_folds,
    })  # fmt: skip


@asset(group_name="attacks", partitions_def=model_versions, deps=[pseudo_labels, augmentation_deltas],
       kinds={"pytorch", "file"})  # fmt: skip
def wsa_attack_model(context: AssetExecutionContext, settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """WSA step 3, cross-fitted: per fold, the paper's MLP on the configured features, the other folds'
    pseudo-members vs the other folds' known non-members; saved as one safetensors file with its sha256
    (logged to MLflow with the audit run)."""
    from m4i_assets.attacks import wsa

    version = context.partition_key
    if reason := interface_skip(storage, version, "wsa"):
        return MaterializeResult(metadata={"skipped": reason})
    cands, known, X, X_known = wsa_inputs(storage, version, settings)
    labels = storage.read("SELECT record_id, is_pseudo_member, fold FROM pseudo_labels WHERE model_version = ?",
                          [version])  # fmt: skip
    labels = cands.select("record_id").join(labels, on="record_id", how="left")
    if labels["fold"].null_count():
        raise ValueError(f"pseudo_labels of {version} do not cover its candidates: materialize pseudo_labels")
    known_folds = wsa.folds_of(known.height, settings.wsa_folds, settings.seed + 1)
    model = wsa.CrossFittedWsa.fit(X, labels["is_pseudo_member"].to_numpy(), X_known, labels["fold"].to_numpy(),
                                   known_folds, random_state=settings.seed)  # fmt: skip
    stored = storage.write_attack_model(version, "wsa.safetensors", model.to_bytes())
    return MaterializeResult(metadata={
        **stored, "n_pseudo_members": int(labels["is_pseudo_member"].sum()), "n_known_nonmembers": known.height,
        "folds": len(model.models), "features": MetadataValue.json(settings.wsa_features),
        "epochs_per_fold": MetadataValue.json([len(m.history_) for m in model.models]),
    })  # fmt: skip


@attack_asset("wsa_scores", deps=[wsa_attack_model])
def wsa_scores(context: AssetExecutionContext, settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """WSA step 4: P(member) of each candidate (and known non-member) under the fold model that did not
    train on it."""
    from m4i_assets.attacks import wsa

    version = context.partition_key
    if reason := interface_skip(storage, version, wsa.ATTACK_ID):
        return skipped_scores(storage, version, wsa.ATTACK_ID, reason)
    model = wsa.CrossFittedWsa.from_bytes(storage.read_attack_model(version, "wsa.safetensors", "wsa_attack_model"))
    cands, known, X, X_known = wsa_inputs(storage, version, settings)
    return write_scores(storage, version, wsa.ATTACK_ID, cands["record_id"], model.score(X),
                        known=(known["record_id"], model.score_known(X_known)))  # fmt: skip


@attack_asset("ref_calibrated_scores", deps=[embeddings])
def ref_calibrated_scores(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage
) -> MaterializeResult:
    """Offline LiRA with one global variance, i.e. difficulty calibration (Carlini et al. 2022; Watson et al.
    2022): the target's CS against the CS of the same records under reference CLIPs trained without any
    candidate."""
    version = context.partition_key
    info = storage.model_info(version)
    refs = references_of(storage, info, settings.n_reference_models)
    cands, known = candidate_signals(storage, version), known_signals(storage, version)
    both = pl.concat([cands.select("record_id", "cosine_similarity"), known.select("record_id", "cosine_similarity")])
    ref_cs = []
    for ref in refs:
        ref_emb = load_signal(storage, "embeddings", ref).select("record_id", "cosine_similarity")
        joined = both.select("record_id").join(ref_emb, on="record_id", how="left")
        if joined["cosine_similarity"].null_count():
            raise ValueError(f"reference {ref} lacks embeddings for some records of {version}'s audit")
        ref_cs.append(joined["cosine_similarity"].to_numpy())
    # candidates and known non-members in one call: one global variance for both
    scores = calibrated.lira_offline_scores(both["cosine_similarity"].to_numpy(), np.stack(ref_cs, axis=1))
    result = write_scores(storage, version, calibrated.ATTACK_ID, cands["record_id"], scores[: cands.height],
                          known=(known["record_id"], scores[cands.height :]))  # fmt: skip
    result.metadata["reference_versions"] = MetadataValue.json(refs)
    return result


def reference_embedding_features(storage: Storage, audit: str, record_ids: pl.Series) -> tuple[np.ndarray | None, str]:
    """Target-independent features for the blind baseline: a reference CLIP's image and text embeddings and
    their CS (the audit's first reference), or None (with why) when the audit has none covering the records."""
    refs = storage.latest_versions(audit, "reference", 1)
    if not refs:
        return None, "the audit has no reference CLIP"
    path = storage.signal_dir("embeddings") / f"{refs[0]}.parquet"
    if not path.exists():
        return None, f"reference {refs[0]} has no embeddings yet"
    emb = pl.DataFrame({"record_id": record_ids}).join(pl.read_parquet(path), on="record_id", how="left")
    if emb["image_embedding"].null_count():
        return None, f"reference {refs[0]} lacks embeddings of some records"
    features = np.c_[stack(emb["image_embedding"]), stack(emb["text_embedding"]), emb["cosine_similarity"].to_numpy()]
    return features, f"embeddings of reference {refs[0]}"


@attack_asset("blind_baseline_scores", deps=[record_roles])
def blind_baseline_scores(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage
) -> MaterializeResult:
    """Blind baseline (Das et al. 2024): cross-validated P(member) from model-free record features (plus a
    reference CLIP's embeddings where the audit has one), its folds' models also scoring the known
    non-members; and the same classifier telling known non-members from candidate non-members (the shift
    gate's second test), in `shift_checks`."""
    from m4i_assets.attacks import blind
    from m4i_assets.metrics.evaluation import evaluate_scores

    version = context.partition_key
    info = storage.model_info(version)
    recs = storage.audit_records(info["audit"], CANDIDATE_ROLES)
    known = storage.audit_records(info["audit"], ("known_nonmember",))
    both = pl.concat([recs, known])
    features, source = reference_embedding_features(storage, info["audit"], both["record_id"])
    f_c, f_k = (None, None) if features is None else (features[: recs.height], features[recs.height :])
    scores, known_scores = blind.blind_scores(
        recs["caption"].to_list(), recs["image_uri"].to_list(), recs["is_member"].to_numpy(),
        n_folds=settings.blind_folds, random_state=settings.seed, features=f_c,
        others=(known["caption"].to_list(), known["image_uri"].to_list(), f_k),
    )  # fmt: skip
    result = write_scores(storage, version, blind.ATTACK_ID, recs["record_id"], scores,
                          known=(known["record_id"], known_scores))  # fmt: skip
    nonmembers = recs.filter(~pl.col("is_member"))
    pool = pl.concat([nonmembers, known])
    is_known = np.r_[np.zeros(nonmembers.height, bool), np.ones(known.height, bool)]
    pool_features = None
    if features is not None:
        pool_features = np.r_[f_c[~recs["is_member"].to_numpy()], f_k]
    shift = blind.blind_scores(pool["caption"].to_list(), pool["image_uri"].to_list(), is_known,
                               n_folds=settings.blind_folds, random_state=settings.seed, features=pool_features)
    ev = evaluate_scores(is_known, shift, n_bootstrap=settings.n_bootstrap, seed=settings.seed)
    row = pl.DataFrame([{"model_version": version, "audit": info["audit"],
                         "comparison": "known_vs_candidate_nonmembers", "auc": ev.point["auc"],
                         "auc_ci_low": ev.ci_low["auc"], "auc_ci_high": ev.ci_high["auc"],
                         "n_a": known.height, "n_b": nonmembers.height}])  # fmt: skip
    storage.write("shift_checks", row, model_version=version)
    result.metadata["target_independent_features"] = source
    result.metadata["known_vs_candidate_nonmembers_auc"] = MetadataValue.json(row.to_dicts()[0])
    return result


attack_assets = [csa_scores, aea_scores, clip_loss_scores, rmia_scores, pseudo_labels, wsa_attack_model, wsa_scores,
                 ref_calibrated_scores, blind_baseline_scores]  # fmt: skip
score_assets = [csa_scores, aea_scores, clip_loss_scores, rmia_scores, wsa_scores, ref_calibrated_scores,
                blind_baseline_scores]  # fmt: skip
