"""Attack assets: each turns stored signals into `membership_scores` rows for one model version.

Every attack is a plain function in `m4i_assets.attacks`, scored on one audited version by its scorer in
`m4i_assets.scoring`; one asset is generated per scorer of its registry (`SCORERS`) and family that runs it
(`<family>/<key>`), and stores the scores with ground truth attached. WSA's pseudo-labels and attack model are
assets of their own.
"""

from functools import partial

import numpy as np
import polars as pl
from dagster import AssetCheckResult, AssetCheckSeverity, MaterializeResult, MetadataValue

from m4i_assets.defs.assets.data import schema_of
from m4i_assets.defs.partitions import Step, VersionAsset
from m4i_assets.defs.resources import Storage
from m4i_assets.scoring import SCORERS, Audited, Scorer, score_frames, score_summary, wsa_inputs

SCORES_CHECK = "candidates_scored"
SCORES_CHECK_SPEC = {SCORES_CHECK: ("every candidate scored once, finite, members and non-members present", True)}


def write_scores(
    storage: Storage, info: dict, candidates: pl.DataFrame, attack: str, record_ids, scores: np.ndarray,
    asset_key: str | None = None, known: tuple | None = None,
) -> MaterializeResult:  # fmt: skip
    """Replace the (version, attack) rows of `membership_scores` and `known_nonmember_scores` with an attack's
    scores (`scoring.score_frames`; `asset_key` names the asset when a multi-asset writes several attacks)."""
    frame, known_frame, complete = score_frames(info, candidates, attack, record_ids, scores, known)
    key = {"model_version": info["model_version"], "attack": attack}
    storage.write("membership_scores", frame, **key)
    storage.write("known_nonmember_scores", known_frame, **key)
    n_members = int(frame["is_member"].sum())
    counts = {"scored": frame.height, "candidates": candidates.height, "members": n_members}
    check = AssetCheckResult(asset_key=asset_key, check_name=SCORES_CHECK, passed=complete, metadata=counts)
    return MaterializeResult(asset_key=asset_key, check_results=[check], metadata={
        "dagster/row_count": frame.height, "n_members": n_members, "n_known_nonmembers_scored": known_frame.height,
        **score_summary(frame),
    })  # fmt: skip


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


def run_scorer(scorer: Scorer, step: Step) -> MaterializeResult:
    """Score the step's version with one attack of the registry and store the scores (skipped, with the reason,
    where the version's release interface rules the attack out)."""
    a = Audited(step.storage, step.settings, step.version)
    if scorer.by_interface and (reason := a.interface_skip(scorer.attack)):
        return skipped_scores(step.storage, a.version, scorer.attack, reason)
    s = scorer.score(a)
    result = write_scores(step.storage, a.info, a.records, scorer.attack, s.ids, s.scores,
                          known=None if s.known_ids is None else (s.known_ids, s.known_scores))  # fmt: skip
    result.metadata.update(s.metadata)
    return result


def label_version(step: Step) -> MaterializeResult:
    """WSA steps 1-2 (Ko et al. 2023, section 3.4): tau from the known non-members' CS alone (their
    (1 - alpha) quantile by default); candidates at or above tau become pseudo-members; each candidate's
    cross-fitting fold. Stores the pseudo-label error rates."""
    from m4i_assets.attacks import wsa

    settings, storage = step.settings, step.storage
    a = Audited(storage, settings, step.version)
    cands, cs_known = a.cands, a.known["cosine_similarity"].to_numpy()
    labels = wsa.pseudo_label(cands["cosine_similarity"].to_numpy(), cs_known, settings.wsa_tau_rule,
                              settings.wsa_alpha, settings.wsa_lambda, settings.wsa_min_pseudo_members)  # fmt: skip
    if labels.rule == "top_k":
        step.context.log.warning(
            f"tau = {labels.tau:.4f} kept fewer than {settings.wsa_min_pseudo_members} candidates: the top "
            f"{settings.wsa_min_pseudo_members} by CS are the pseudo-members (rule {labels.rule})"
        )
    is_member = cands["is_member"].to_numpy()
    labelled = cands["is_member"].null_count() == 0  # an unlabelled audit's candidates have no ground truth
    is_known = is_member.astype(bool) if labelled else None
    frame = pl.DataFrame({
        "model_version": a.version, "record_id": cands["record_id"], "cosine_similarity": cands["cosine_similarity"],
        "tau": labels.tau, "wsa_lambda": settings.wsa_lambda, "wsa_alpha": settings.wsa_alpha, "rule": labels.rule,
        "is_pseudo_member": labels.is_pseudo_member, "is_member": is_member,
        "fold": wsa.folds_of(cands.height, settings.wsa_folds, settings.seed),
    })  # fmt: skip
    storage.write("pseudo_labels", frame, model_version=a.version)
    return MaterializeResult(metadata={
        "dagster/row_count": frame.height, "dagster/column_schema": schema_of(frame), "tau": labels.tau,
        "n_pseudo_members": int(labels.is_pseudo_member.sum()), "n_known_nonmembers": len(cs_known),
        "pseudo_label_error_rate_over_training_set":
            labels.training_set_error_rate(is_known, len(cs_known)) if labelled else float("nan"),
        "nonmember_share_of_pseudo_members": labels.error_rate(is_known) if labelled else float("nan"),
        "rule": labels.rule,
        "folds": settings.wsa_folds,
    })  # fmt: skip


def fit_wsa(step: Step) -> MaterializeResult:
    """WSA step 3, cross-fitted: per fold, the paper's MLP on the configured features, the other folds'
    pseudo-members vs the other folds' known non-members; saved as one safetensors file with its sha256
    (logged to MLflow with the audit run)."""
    from m4i_assets.attacks import wsa

    settings, storage = step.settings, step.storage
    a = Audited(storage, settings, step.version)
    if reason := a.interface_skip("wsa"):
        return MaterializeResult(metadata={"skipped": reason})
    X, X_known = wsa_inputs(a)
    labels = a.repo.of_version("pseudo_labels", a.version).select("record_id", "is_pseudo_member", "fold")
    labels = a.cands.select("record_id").join(labels, on="record_id", how="left")
    if labels["fold"].null_count():
        raise ValueError(f"pseudo_labels of {a.version} do not cover its candidates: materialize pseudo_labels")
    known_folds = wsa.folds_of(a.known.height, settings.wsa_folds, settings.seed + 1)
    model = wsa.CrossFittedWsa.fit(X, labels["is_pseudo_member"].to_numpy(), X_known, labels["fold"].to_numpy(),
                                   known_folds, random_state=settings.seed)  # fmt: skip
    stored = storage.write_attack_model(a.version, "wsa.safetensors", model.to_bytes())
    return MaterializeResult(metadata={
        **stored, "n_pseudo_members": int(labels["is_pseudo_member"].sum()), "n_known_nonmembers": a.known.height,
        "folds": len(model.models), "features": MetadataValue.json(settings.wsa_features),
        "epochs_per_fold": MetadataValue.json([len(m.history_) for m in model.models]),
    })  # fmt: skip


VERSION_ASSETS = [
    VersionAsset("pseudo_labels", label_version, ("embeddings",), "attacks", frozenset({"duckdb"})),
    VersionAsset("wsa_attack_model", fit_wsa, ("pseudo_labels", "augmentation_deltas"), "attacks",
                 frozenset({"pytorch", "file"})),
    *(VersionAsset(s.key, partial(run_scorer, s), tuple(s.deps), "attacks", frozenset({"duckdb"}),
                   SCORES_CHECK_SPEC, description=s.description) for s in SCORERS),
]  # fmt: skip
