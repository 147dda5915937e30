"""How each attack scores one audited model version: the facts of the version read once (`Audited`), one scorer
per attack turning its stored signals into scores of the candidates and the known non-members (`Scored`), and
the registry of attacks (`SCORERS`) the Dagster layer generates one asset from each. The science is in
`m4i_assets.attacks`; this module only aligns signals by record id and calls it (the README's attack tables name
each one's source)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import polars as pl

from m4i_assets.attacks import aea, calibrated, clip_loss, rmia
from m4i_assets.defenses.release import RELEASE_DEFENSES, Release, attack_skip_reason, interface_of
from m4i_assets.families import zero_shot_text_embeddings
from m4i_assets.metrics.evaluation import evaluate_scores
from m4i_assets.settings import AuditSettings
from m4i_assets.storage.home import Home
from m4i_assets.storage.repository import Repository


def release_of(info: dict, seed: int) -> Release:
    """What a registered model version releases: its release-time defense, if it has one (else raw outputs).
    The noise is keyed on the seed stored with the version when it was registered (`defense_facts`), so one
    version name always covers the same noise; `seed` (the live settings') only for versions without one."""
    if info.get("defense") in RELEASE_DEFENSES:
        facts = json.loads(info.get("defense_facts") or "{}")
        stored = facts.get("seed")
        return Release(info["defense"], info["defense_strength"], seed if stored is None else int(stored),
                       facts.get("queries", 1))  # fmt: skip
    return Release()


@dataclass
class Audited:
    """One model version as its attack assets read it, each fact once: its `models` row (`info`), its audit's
    candidates and known non-members (`records`, `known_records`) and those joined to its embeddings (`cands`,
    `known`), by record id."""

    storage: Home
    settings: AuditSettings
    version: str
    repo: Repository = field(init=False)
    info: dict = field(init=False)

    def __post_init__(self) -> None:
        self.repo = self.storage.repository
        self.info = self.repo.model_info(self.version)

    @cached_property
    def records(self) -> pl.DataFrame:
        return self.repo.candidates(self.version)

    @cached_property
    def known_records(self) -> pl.DataFrame:
        return self.repo.known_nonmembers(self.version)

    @cached_property
    def embeddings(self) -> pl.DataFrame:
        return self.repo.signal("embeddings", self.version)

    def _embedded(self, records: pl.DataFrame) -> pl.DataFrame:
        return self.embeddings.join(records.select("record_id", "is_member"), on="record_id").sort("record_id")

    @cached_property
    def cands(self) -> pl.DataFrame:
        return self._embedded(self.records)

    @cached_property
    def known(self) -> pl.DataFrame:
        return self._embedded(self.known_records)

    @cached_property
    def deltas(self) -> pl.DataFrame:
        return self.repo.signal("augmentation_deltas", self.version)

    def wide_deltas(self, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """`aea.wide_deltas` of these records (a frame of `cands` or `known`)."""
        return aea.wide_deltas(self.deltas, frame["record_id"])

    def references(self) -> list[str]:
        """The reference CLIPs its calibrated attacks calibrate against: those trained with its defense for an
        adaptive attacker's twin of a training-time defense (`defense_facts.references`), else the audit's own
        (`AuditSettings.reference_count`)."""
        stored = json.loads(self.info.get("defense_facts") or "{}").get("references")
        if stored:
            return sorted(stored)
        return self.repo.reference_versions(self.info["audit"], self.settings.reference_count(self.storage.root))

    def interface_skip(self, attack: str) -> str | None:
        """Why `attack` cannot run against this version's release interface (`defenses.release.interface_of`: e.g.
        WSA's MLP needs embeddings, a similarity-rounding release gives similarities only); None when it can."""
        return attack_skip_reason(attack, interface_of(self.info["family"], self.info.get("defense")))


def stack(column: pl.Series) -> np.ndarray:
    return np.stack(column.to_numpy())


@dataclass(frozen=True)
class Scored:
    """An attack's scores of the candidates and of the known non-members (`known_ids`, None: it has none), with
    the asset metadata it adds."""

    ids: pl.Series
    scores: np.ndarray
    known_ids: pl.Series | None = None
    known_scores: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)


def score_csa(a: Audited) -> Scored:
    return Scored(a.cands["record_id"], a.cands["cosine_similarity"].to_numpy(), a.known["record_id"],
                  a.known["cosine_similarity"].to_numpy())  # fmt: skip


def score_aea(a: Audited) -> Scored:
    (cs, deltas), (cs_known, deltas_known) = a.wide_deltas(a.cands), a.wide_deltas(a.known)
    agg = a.settings.aea_aggregation
    return Scored(a.cands["record_id"], aea.aea_scores(cs, deltas, agg, cs_known, deltas_known), a.known["record_id"],
                  aea.aea_scores(cs_known, deltas_known, agg, cs_known, deltas_known),
                  {"aggregation": agg, "transforms": deltas.shape[1]})  # fmt: skip


def clip_log_probs(a: Audited, version: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """`clip_loss` log-likelihoods of `a`'s candidates and (each against the others) known non-members under a
    CLIP version's released embeddings (`a`'s own or a reference's), under that version's own pairing objective
    (`ClipBundle.objective`: softmax InfoNCE at its logit scale, or the sigmoid pair likelihood at its scale and
    bias), and that objective (kind, logit scale used: `settings.clip_loss_logit_scale` > 0 replaces the model's,
    logit bias)."""
    from m4i_assets.models import clip

    info = a.info if version == a.version else a.repo.model_info(version)
    objective = clip.load_clip(info["checkpoint_uri"], info["arch"], "cpu").objective
    scale = a.settings.clip_loss_logit_scale if a.settings.clip_loss_logit_scale > 0 else objective.logit_scale
    pairing = {"objective": objective.kind, "logit_bias": objective.logit_bias}
    used = {"objective": objective.kind, "logit_scale": scale, "logit_bias": objective.logit_bias}
    emb = a.embeddings if version == a.version else a.repo.signal("embeddings", version)
    c = a.cands.select("record_id").join(emb, on="record_id", how="left")
    k = a.known.select("record_id").join(emb, on="record_id", how="left")
    if c["image_embedding"].null_count() or k["image_embedding"].null_count():
        raise ValueError(f"{version} lacks embeddings for some records of its audit: materialize embeddings")
    release = release_of(info, a.settings.seed).similarities
    img, txt, kimg, ktxt = (stack(f[col]) for f in (c, k) for col in ("image_embedding", "text_embedding"))
    lp = clip_loss.clip_loss_scores(img, txt, kimg, ktxt, scale, release, **pairing)
    return lp, clip_loss.self_excluded_log_probs(kimg, ktxt, scale, release, **pairing), used


def score_clip_loss(a: Audited) -> Scored:
    lp, lp_known, objective = clip_log_probs(a, a.version)
    return Scored(
        a.cands["record_id"], lp, a.known["record_id"], lp_known, {**objective, "n_negatives": a.known.height}
    )


def score_rmia(a: Audited) -> Scored:
    refs = a.references()
    lp, lp_known, _ = clip_log_probs(a, a.version)
    ref_lp = [clip_log_probs(a, ref)[:2] for ref in refs]
    p_ref = np.exp(np.stack([r[0] for r in ref_lp], axis=1))
    p_ref_known = np.exp(np.stack([r[1] for r in ref_lp], axis=1))
    p_known, ra = np.exp(lp_known), a.settings.rmia_a
    scores = rmia.rmia_scores(np.exp(lp), p_ref, p_known, p_ref_known, ra)
    known_scores = rmia.rmia_scores(p_known, p_ref_known, p_known, p_ref_known, ra)
    return Scored(a.cands["record_id"], scores, a.known["record_id"], known_scores,
                  {"reference_versions": refs, "a": ra})  # fmt: skip


def wsa_inputs(a: Audited) -> tuple[np.ndarray, np.ndarray]:
    """The WSA features (`settings.wsa_features`) of the candidates and the known non-members."""
    from m4i_assets.attacks import wsa

    kinds = tuple(a.settings.wsa_features)
    return tuple(
        wsa.wsa_features(stack(f["image_embedding"]), stack(f["text_embedding"]), kinds,
                         a.wide_deltas(f)[1] if "deltas" in kinds else None)
        for f in (a.cands, a.known)
    )  # fmt: skip


def score_wsa(a: Audited) -> Scored:
    from m4i_assets.attacks import wsa

    model = wsa.CrossFittedWsa.from_bytes(a.storage.read_attack_model(a.version, "wsa.safetensors", "wsa_attack_model"))
    X, X_known = wsa_inputs(a)
    return Scored(a.cands["record_id"], model.score(X), a.known["record_id"], model.score_known(X_known))


def score_ref_calibrated(a: Audited) -> Scored:
    refs = a.references()
    both = pl.concat([f.select("record_id", "cosine_similarity") for f in (a.cands, a.known)])
    ref_cs = []
    for ref in refs:
        ref_emb = a.repo.signal("embeddings", ref).select("record_id", "cosine_similarity")
        joined = both.select("record_id").join(ref_emb, on="record_id", how="left")
        if joined["cosine_similarity"].null_count():
            raise ValueError(f"reference {ref} lacks embeddings for some records of {a.version}'s audit")
        ref_cs.append(joined["cosine_similarity"].to_numpy())
    # candidates and known non-members in one call: one global variance for both
    scores = calibrated.lira_offline_scores(both["cosine_similarity"].to_numpy(), np.stack(ref_cs, axis=1))
    n = a.cands.height
    return Scored(a.cands["record_id"], scores[:n], a.known["record_id"], scores[n:],
                  {"reference_versions": refs})  # fmt: skip


def reference_embedding_features(a: Audited, record_ids: pl.Series) -> tuple[np.ndarray | None, str]:
    """Target-independent features for the blind baseline: a reference CLIP's image and text embeddings and
    their CS (the audit's first reference), or None (with why) when the audit has none covering the records."""
    refs = a.repo.latest_versions(a.info["audit"], "reference", 1)
    if not refs:
        return None, "the audit has no reference CLIP"
    path = a.storage.signal_dir("embeddings") / f"{refs[0]}.parquet"
    if not path.exists():
        return None, f"reference {refs[0]} has no embeddings yet"
    emb = pl.DataFrame({"record_id": record_ids}).join(pl.read_parquet(path), on="record_id", how="left")
    if emb["image_embedding"].null_count():
        return None, f"reference {refs[0]} lacks embeddings of some records"
    features = np.c_[stack(emb["image_embedding"]), stack(emb["text_embedding"]), emb["cosine_similarity"].to_numpy()]
    return features, f"embeddings of reference {refs[0]}"


def score_blind(a: Audited) -> Scored:
    """Also writes the known-vs-candidate non-member shift check of the same classifier (`shift_checks`)."""
    from m4i_assets.attacks import blind

    recs, known, settings = a.records, a.known_records, a.settings
    features, source = reference_embedding_features(a, pl.concat([recs["record_id"], known["record_id"]]))
    f_c, f_k = (None, None) if features is None else (features[: recs.height], features[recs.height :])
    scores, known_scores = blind.blind_scores(
        recs["caption"].to_list(), recs["image_uri"].to_list(), recs["is_member"].to_numpy(),
        n_folds=settings.blind_folds, random_state=settings.seed, features=f_c,
        others=(known["caption"].to_list(), known["image_uri"].to_list(), f_k),
    )  # fmt: skip
    nonmember = ~recs["is_member"].to_numpy()
    nonmembers = recs.filter(pl.Series(nonmember))
    is_known, shift = blind.known_vs_candidate_scores(
        (nonmembers["caption"].to_list(), nonmembers["image_uri"].to_list(), None if f_c is None else f_c[nonmember]),
        (known["caption"].to_list(), known["image_uri"].to_list(), f_k), settings.blind_folds, settings.seed,
    )  # fmt: skip
    ev = evaluate_scores(is_known, shift, n_bootstrap=settings.n_bootstrap, seed=settings.seed)
    row = pl.DataFrame([{"model_version": a.version, "audit": a.info["audit"],
                         "comparison": "known_vs_candidate_nonmembers", "auc": ev.point["auc"],
                         "auc_ci_low": ev.ci_low["auc"], "auc_ci_high": ev.ci_high["auc"],
                         "n_a": known.height, "n_b": nonmembers.height}])  # fmt: skip
    a.storage.write("shift_checks", row, model_version=a.version)
    return Scored(recs["record_id"], scores, known["record_id"], known_scores, {
        "target_independent_features": source,
        "known_vs_candidate_nonmembers_auc": row.to_dicts()[0],
    })  # fmt: skip


def score_frames(
    info: dict, candidates: pl.DataFrame, attack: str, record_ids, scores: np.ndarray, known: tuple | None = None
) -> tuple[pl.DataFrame, pl.DataFrame, bool]:
    """The `membership_scores` rows of an attack on a version (its candidate scores with ground truth from
    `candidates`: record_id, is_member), its `known_nonmember_scores` rows (`known`: record ids, scores; None: it
    has none), and whether every candidate was scored once, finitely, members and non-members both present (an
    unlabelled audit: no ground truth at all)."""
    version, audit = info["model_version"], info["audit"]
    roles = candidates.select("record_id", "is_member")
    frame = (
        pl.DataFrame({"record_id": record_ids, "score": np.asarray(scores, dtype=np.float64)})
        .join(roles, on="record_id", how="inner")
        .with_columns(model_version=pl.lit(version), attack=pl.lit(attack), audit=pl.lit(audit))
    )
    n_members = int(frame["is_member"].sum())
    labelled = frame["is_member"].null_count() == 0  # an unlabelled audit's candidates have no ground truth
    complete = bool(
        np.isfinite(frame["score"].to_numpy()).all()
        and frame.height == roles.height
        and frame["record_id"].n_unique() == frame.height
        and (0 < n_members < frame.height if labelled else frame["is_member"].null_count() == frame.height)
    )
    known_frame = pl.DataFrame(
        {"record_id": [] if known is None else known[0],
         "score": np.asarray([] if known is None else known[1], dtype=np.float64)},
        schema={"record_id": pl.String, "score": pl.Float64},
    ).with_columns(model_version=pl.lit(version), attack=pl.lit(attack), audit=pl.lit(audit))  # fmt: skip
    return frame, known_frame, complete


def score_summary(frame: pl.DataFrame) -> dict[str, float]:
    """Mean score of members and of non-members (of the candidates, in an unlabelled audit)."""
    if frame["is_member"].null_count():
        return {"mean_score_candidates": float(frame["score"].mean())}
    return {"mean_score_members": float(frame.filter(pl.col("is_member"))["score"].mean()),
            "mean_score_nonmembers": float(frame.filter(~pl.col("is_member"))["score"].mean())}  # fmt: skip


@dataclass(frozen=True)
class Scorer:
    """One attack of the registry: its id, the asset that stores its scores, what that asset reads (a family's
    per-version assets by name, or unpartitioned ones: roles, the reference CLIPs' embeddings), what the
    attack is (the asset's description), how it scores an audited version, and whether a release interface can
    rule it out."""

    attack: str
    key: str
    deps: list[str]
    description: str
    score: Callable[[Audited], Scored]
    by_interface: bool = False


REFS = "reference_embeddings"  # the reference CLIPs' embeddings (the CLIP family's helper asset)
SCORERS = [
    Scorer("csa", "csa_scores", ["embeddings"], "CSA (Ko et al. 2023, section 3.2): the image-text cosine "
           "similarity of each candidate (and known non-member).", score_csa),
    Scorer("aea", "aea_scores", ["augmentation_deltas"], "AEA (Ko et al. 2023, section 3.3): clean CS and the "
           "augmentation deltas, aggregated on the known non-members' scale (`settings.aea_aggregation`).", score_aea),
    Scorer("clip_loss", "clip_loss_scores", ["embeddings"], "`clip_loss` (ours, beyond both papers): the model's own "
           "pairing objective for each candidate's matched pair against the known non-members' captions and images, "
           "both directions: the InfoNCE log-probability at the logit scale (CLIP-type), or the sigmoid pair "
           "log-likelihood at the logit scale and bias (SigLIP-type).", score_clip_loss),
    Scorer("rmia", "rmia_scores", ["embeddings", REFS], "RMIA (Zarifzadeh et al. 2024), offline: the "
           "`clip_loss` probability's ratio to the reference CLIPs', compared with the same ratio of the known "
           "non-members (the population z).", score_rmia),
    Scorer("wsa", "wsa_scores", ["wsa_attack_model"], "WSA step 4: P(member) of each candidate (and known "
           "non-member) under the fold model that did not train on it.", score_wsa, by_interface=True),
    Scorer("ref_calibrated", "ref_calibrated_scores", ["embeddings", REFS], "Offline LiRA with one global "
           "variance, i.e. difficulty calibration (Carlini et al. 2022; Watson et al. 2022): the target's CS against "
           "the CS of the same records under reference CLIPs trained without any candidate.", score_ref_calibrated),
    Scorer("blind_baseline", "blind_baseline_scores", ["record_roles", REFS], "Blind baseline (Das et al. 2024): "
           "cross-validated P(member) from model-free record features (plus a reference CLIP's embeddings where the "
           "audit has one), its folds' models also scoring the known non-members; and the same classifier telling "
           "known non-members from candidate non-members (the shift gate's second test), in `shift_checks`.",
           score_blind),
]  # fmt: skip


def retrieval_utility(
    repo: Repository, settings: AuditSettings, device: str, info: dict, held: pl.DataFrame
) -> tuple[dict, dict]:
    """A CLIP's utility: retrieval recall@1/5/10 both ways and zero-shot shape accuracy on held-out records, from
    the version's released embeddings and similarities (prompts released like any text query; similarity rounding
    rounds the scores the rankings read, pessimistic ties), and each one's chance level (Radford et al. 2021,
    section 3.1.4)."""
    from m4i_assets.data import corpus
    from m4i_assets.metrics import utility
    from m4i_assets.models import clip

    emb = repo.signal("embeddings", info["model_version"]).join(held.select("record_id"), on="record_id")
    emb = emb.sort("record_id")
    img, txt = np.stack(emb["image_embedding"].to_numpy()), np.stack(emb["text_embedding"].to_numpy())
    release = release_of(info, settings.seed)  # its similarities as released (rounded under similarity rounding)
    values = utility.retrieval_recall(img, txt, ks=(1, 5, 10), released=release.similarities)
    chance = utility.retrieval_chance((1, 5, 10), n_texts=len(txt), n_images=len(img))
    meta = repo.record_metadata(emb["record_id"].to_list())
    classes, labels = corpus.zero_shot_task(meta["metadata"].to_list())
    if any(label is not None for label in labels):
        prompts = corpus.zero_shot_prompts(classes, settings.corpus_style)
        flat = [p for per_class in prompts for p in per_class]
        bundle = clip.load_clip(info["checkpoint_uri"], info["arch"], device)
        text = release.embeddings(zero_shot_text_embeddings(bundle, flat), flat, "text")
        values["zero_shot_accuracy"] = utility.zero_shot_accuracy(img, text.reshape(len(classes), -1, text.shape[1]),
                                                                  labels, released=release.similarities)  # fmt: skip
        chance["zero_shot_accuracy"] = utility.zero_shot_chance(len(classes))
    return values, chance


def captioning_utility(
    repo: Repository, settings: AuditSettings, device: str, info: dict, held: pl.DataFrame
) -> tuple[dict, dict]:
    """A captioner's utility: BLEU-4, ROUGE-L and CIDEr of the version's (released) captions of held-out records,
    against all their references (the per-record values `caption_metrics` computed, averaged), and their chance
    levels: the same metrics for captions that ignore the image (another held-out image's reference)."""
    from m4i_assets.metrics import utility

    metrics = repo.signal("caption_metrics", info["model_version"]).join(held.select("record_id"), on="record_id")
    values = {name: float(metrics[name].mean()) for name in ("bleu4", "rougeL", "cider") if name in metrics.columns}
    references = held.sort("record_id").group_by("image_uri", maintain_order=True).agg("caption")["caption"]
    chance = utility.caption_chance(references.to_list()) if len(references) > 1 else {}
    return values, {k: v for k, v in chance.items() if k in values}


UTILITIES: dict[str, Callable[..., tuple[dict, dict]]] = {"retrieval": retrieval_utility,
                                                          "captioning": captioning_utility}  # fmt: skip
"""Each utility measure of the family registry (`Family.utility`): (repository, settings, torch device, the
version's `models` row, held-out records) -> (metric values, their chance levels)."""
