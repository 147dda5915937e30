"""Captioning assets (M^4I, Hu et al. 2022): per audited captioner version (`captioner/<name>`) its generated
captions, caption metrics and caption likelihoods, the MB / FB / loss scores under every threat scenario and the
scenario table; and the family's helper asset, `m4i_attack_models`, which computes the same signals for every
shadow captioner of the audit and trains the attack models each teaches.

Shadows are no partitions: the attack models are files the scoring asset reads, declared as its dependency,
as the reference CLIPs' embeddings are for the calibrated CLIP attacks.
"""

import json
from pathlib import Path

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)

from m4i_assets import plans
from m4i_assets.attacks import caption_loss
from m4i_assets.attacks.adaptive import average_over_queries, image_query_keys
from m4i_assets.defenses.release import attack_skip_reason, interface_of
from m4i_assets.defs.assets.attacks import SCORES_CHECK_SPEC, skipped_scores, write_scores
from m4i_assets.defs.assets.data import schema_of
from m4i_assets.defs.assets.models import verified_checkpoint
from m4i_assets.defs.assets.signals import EMBEDDED_ROLES, helper_versions, load_signal, write_signal
from m4i_assets.defs.partitions import TRAINED, VERSION_PARTITIONS, Step, VersionAsset, dep_keys, version_key
from m4i_assets.defs.resources import GPU_STEP, Compute, Storage, Tracking
from m4i_assets.families import CAPTIONER_SCORES, FAMILIES, Family
from m4i_assets.metrics import report
from m4i_assets.metrics.scenarios import scenario_metrics, scenario_rows
from m4i_assets.scoring import release_of
from m4i_assets.settings import AuditSettings
from m4i_assets.storage.repository import SHADOW_ROLES, Repository

ATTACK_FILES = MB_FILE, MFE_FILE, FB_FILE = "m4i_mb.joblib", "m4i_mfe.safetensors", "m4i_fb.joblib"


def captioner_info(repo: Repository, version: str) -> dict:
    """A captioner version's `models` row (a clear error for another family's)."""
    info = repo.model_info(version)
    if "generated_captions" not in FAMILIES[info["family"]].signals:
        raise ValueError(f"{version} is a {info['family']} model; captioning assets need a captioner version")
    return info


def caption_version(step: Step) -> MaterializeResult:
    """Step 1 of both M^4I attacks: the captioner's released caption (greedy; sampled for the sampled-decoding
    defense) for each record it is queried on (the candidates, those of the step's record shard; for a shadow
    model, its known members and non-members), batched."""
    from m4i_assets.models import captioner

    version, settings, storage, compute = step.version, step.settings, step.storage, step.compute
    repo = storage.repository
    info = captioner_info(repo, version)
    verified_checkpoint(storage, version)
    recs = repo.captioned_records(version)
    recs = recs[step.shard.rows(recs.height, settings.caption_batch_size)]
    bundle = captioner.load_captioner(Path(info["checkpoint_uri"]).parent, compute.torch_device)
    release = release_of(info, settings.seed)  # sampled decoding, for that release-time defense
    uris = recs["image_uri"].to_list()
    # the release keys its sampling on the queried image's bytes; an adaptive attacker sends `queries` encodings
    keys = image_query_keys(uris, release.queries) if release.temperature > 0 else [[""] * len(uris)]
    steps = captioner.caption_steps(bundle.spec.max_len)
    per_query = [captioner.generate_captions(bundle, uris, settings.caption_batch_size, compute.torch_device,
                                             release.temperature, draws=release.decoding_draws(k, steps))
                 for k in keys]  # fmt: skip
    captions = per_query[0]
    frame = pl.DataFrame({"model_version": version, "record_id": recs["record_id"], "generated_caption": captions})
    if len(per_query) > 1:  # every query's caption, for the k-query attacker's averaged features
        frame = frame.with_columns(query_captions=pl.Series([list(q) for q in zip(*per_query)]))
    path = write_signal(storage, "generated_captions", version, frame, step.shard)
    n_empty = sum(not c.strip() for c in captions)
    sample = recs.head(5).with_columns(generated=pl.Series(captions[:5]))
    table = "\n".join(
        ["| record | member | reference | generated |", "|---|---|---|---|"]
        + [f"| {r['record_id']} | {r['is_member']} | {r['caption']} | {r['generated']} |" for r in sample.to_dicts()]
    )
    check = AssetCheckResult(
        check_name="one_caption_per_record",
        passed=frame.height == recs.height and frame["record_id"].n_unique() == frame.height,
        metadata={"rows": frame.height, "records": recs.height, "empty_captions": n_empty},
    )
    return MaterializeResult(check_results=[check], metadata={
        "dagster/row_count": frame.height, "dagster/column_schema": schema_of(frame), "path": str(path),
        "empty_captions": n_empty, "sample": MetadataValue.md(table),
    })  # fmt: skip


def metrics_of_version(step: Step) -> MaterializeResult:
    """MB step 2 (M^4I section 3.2): caption metrics of each generated caption against all reference
    captions of its image (BLEU-1..4, ROUGE-1/2/L, CIDEr-D by default; METEOR when configured)."""
    from m4i_assets.metrics.captions import caption_metric_features, cider_corpus

    version, settings, storage = step.version, step.settings, step.storage
    repo = storage.repository
    info = captioner_info(repo, version)
    gen = load_signal(storage, "generated_captions", version).sort("record_id")
    metrics = tuple(settings.caption_metrics)
    # CIDEr-D's document frequencies: fixed once, on the attacker's own references (the population's, else the
    # known non-members'), for shadow and target features alike (not on each call's own records); an audit with
    # neither scores with the queried records' own frequencies, as plain CIDEr-D does
    corpus = None
    for roles in (("population",), ("known_nonmember",)):
        attacker = repo.audit_records(info["audit"], roles)["record_id"].to_list()
        if attacker and "cider" in metrics:
            corpus = cider_corpus(repo.references(attacker))
            break
    references = repo.references(gen["record_id"].to_list())
    queried = query_captions(gen)
    values = average_over_queries([caption_metric_features(q, references, metrics, corpus) for q in queried])
    frame = pl.DataFrame({"model_version": version, "record_id": gen["record_id"]}).with_columns(
        pl.DataFrame(values, schema=list(metrics))
    )
    path = write_signal(storage, "caption_metrics", version, frame)
    truth = repo.captioned_records(version).select("record_id", "is_member")
    means = frame.join(truth, on="record_id").group_by("is_member").agg(pl.col(m).mean() for m in metrics)
    check = AssetCheckResult(
        check_name="finite_metrics",
        passed=bool(frame.height == gen.height and np.isfinite(values).all()),
        metadata={"rows": frame.height, "metrics": list(metrics)},
    )
    return MaterializeResult(check_results=[check], metadata={
        "dagster/row_count": frame.height, "dagster/column_schema": schema_of(frame), "path": str(path),
        "mean_by_membership": MetadataValue.json({("member" if r.pop("is_member") else "nonmember"): r
                                                  for r in means.to_dicts()}),
    })  # fmt: skip


def nll_of_version(step: Step) -> MaterializeResult:
    """The teacher-forced negative log-likelihood of each candidate's and known non-member's reference caption
    given its image, under this captioner (`m4i_loss`, `m4i_loss_ref`; for a shadow, its OUT likelihoods), of the
    step's record shard."""
    from m4i_assets.models import captioner

    version, settings, storage, compute = step.version, step.settings, step.storage, step.compute
    repo = storage.repository
    info = captioner_info(repo, version)
    verified_checkpoint(storage, version)
    recs = repo.audit_records(info["audit"], EMBEDDED_ROLES)
    recs = recs[step.shard.rows(recs.height, settings.caption_batch_size)]
    bundle = captioner.load_captioner(Path(info["checkpoint_uri"]).parent, compute.torch_device)
    nll = captioner.caption_nll(bundle, recs["image_uri"].to_list(), recs["caption"].to_list(),
                                settings.caption_batch_size, compute.torch_device)  # fmt: skip
    frame = pl.DataFrame({"model_version": version, "record_id": recs["record_id"], "nll": nll})
    path = write_signal(storage, "caption_nll", version, frame, step.shard)
    by_role = frame.with_columns(role=recs["role"]).group_by("role").agg(pl.col("nll").mean())
    check = AssetCheckResult(check_name="finite_nll", passed=bool(frame.height == recs.height
                                                                  and np.isfinite(nll).all()),
                             metadata={"rows": frame.height, "records": recs.height})  # fmt: skip
    return MaterializeResult(check_results=[check], metadata={
        "dagster/row_count": frame.height, "path": str(path),
        "mean_nll_by_role": MetadataValue.json(dict(by_role.iter_rows())),
    })  # fmt: skip


def query_captions(gen: pl.DataFrame) -> list[list[str]]:
    """Each query's released captions of a `generated_captions` frame: one list per query (the adaptive attacker's
    k queries of a sampled-decoding release, `query_captions`), else the generated captions alone."""
    if "query_captions" not in gen.columns:
        return [gen["generated_caption"].to_list()]
    return [list(q) for q in zip(*gen["query_captions"].to_list())]


def nll_of(storage: Storage, version: str, record_ids: pl.Series) -> np.ndarray:
    """A captioner's caption NLL of these records, in their order."""
    frame = pl.DataFrame({"record_id": record_ids}).join(
        load_signal(storage, "caption_nll", version).select("record_id", "nll"), on="record_id", how="left"
    )
    if frame["nll"].null_count():
        raise ValueError(f"caption_nll of {version} lacks some records of its audit: materialize caption_nll")
    return frame["nll"].to_numpy()


def features(storage: Storage, repo: Repository, version: str, metrics: list[str]) -> pl.DataFrame:
    """A captioner's queried records with ground truth, generated caption and caption metrics."""
    return (
        repo.captioned_records(version)
        .join(load_signal(storage, "generated_captions", version).drop("model_version"), on="record_id")
        .join(load_signal(storage, "caption_metrics", version).select("record_id", *metrics), on="record_id")
        .sort("record_id")
    )


def m4i_attack_models(family: Family):
    """The helper asset of a family whose helpers are shadow captioners (`Family.helper_asset`)."""
    signals = {"generated_captions": "one_caption_per_record", "caption_metrics": "finite_metrics",
               "caption_nll": "finite_nll"}  # fmt: skip
    key = AssetKey(family.helper_asset)

    @asset(
        key=key,
        op_tags=GPU_STEP,
        group_name="attacks",
        deps=[AssetKey(family.models[2]), AssetKey(family.defended), AssetKey("record_roles")],
        kinds={"pytorch", "sklearn"},
        check_specs=[AssetCheckSpec(check, asset=key, blocking=True, description=f"every shadow's {name}")
                     for name, check in signals.items()],
    )  # fmt: skip
    def _attack_models(
        context: AssetExecutionContext, settings: AuditSettings, storage: Storage, compute: Compute, tracking: Tracking
    ) -> MaterializeResult:
        """What every shadow captioner of the audit teaches the attacker (M^4I sections 3.2-3.3): its captions of
        its own known members and non-members, their caption metrics and every candidate's and known
        non-member's caption likelihood (calibrating `m4i_loss_ref`), then the attack models it trains
        (`train_shadow_attack_models`)."""
        versions = helper_versions(storage, settings, family)
        per_version, passed = {}, {check: True for check in signals.values()}
        for version in versions:
            context.log.info(f"shadow {version}: captions, caption metrics, caption likelihoods, attack models")
            step = Step(version, settings, storage, compute, tracking, context)
            for result in (caption_version(step), metrics_of_version(step), nll_of_version(step)):
                check = result.check_results[0]
                passed[check.check_name] &= check.passed
            per_version[version] = train_shadow_attack_models(storage, settings, compute, version)
        return MaterializeResult(
            metadata={"shadow_versions": MetadataValue.json(versions),
                      "attack_models": MetadataValue.json(per_version)},
            check_results=[AssetCheckResult(check_name=c, passed=ok) for c, ok in passed.items()],
        )  # fmt: skip

    return _attack_models


def train_shadow_attack_models(storage: Storage, settings: AuditSettings, compute: Compute, version: str) -> dict:
    """What one shadow captioner teaches the attacker (M^4I sections 3.2-3.3): the MB classifier on its
    caption metrics, the multimodal feature extractor (MFE) on a seeded half of its records and the FB
    classifier on |MFE_img - MFE_txt(generated)| of the other half (the MFE never embeds a record the FB
    classifier learns from), each a file with its sha256."""
    from m4i_assets.attacks import m4i

    repo = storage.repository
    info = captioner_info(repo, version)
    if info["role"] not in SHADOW_ROLES:
        raise ValueError(f"{version} is a {info['role']} model: attack models are trained on shadow models only")
    data = features(storage, repo, version, settings.caption_metrics)
    y = data["is_member"].to_numpy()
    fitted = m4i.train_attack_models(
        data.select(settings.caption_metrics).to_numpy(), data["image_uri"].to_list(), data["caption"].to_list(),
        data["generated_caption"].to_list(), y,
        m4i.ShadowClassifier(tuple(settings.mb_classifiers), settings.mb_svm_c, random_state=settings.seed),
        m4i.ShadowClassifier(tuple(settings.fb_classifiers), random_state=settings.seed),
        settings.mfe_spec(), settings.seed, compute.torch_device,
    )  # fmt: skip
    mb, fb = fitted.mb, fitted.fb
    blobs = {MB_FILE: mb.to_bytes(), MFE_FILE: fitted.mfe.to_bytes(), FB_FILE: fb.to_bytes()}
    files = {name: storage.write_attack_model(version, name, blob) for name, blob in blobs.items()}
    return {
        "files": files, "n_shadow_members": int(y.sum()), "n_shadow_nonmembers": int((~y).sum()),
        "mb_classifier": mb.kind_, "mb_shadow_accuracy": mb.shadow_accuracy_,
        "fb_classifier": fb.kind_, "fb_shadow_accuracy": fb.shadow_accuracy_,
        "n_mfe_records": int(fitted.mfe_part.sum()), "n_fb_records": int(fitted.fb_part.sum()),
        "fb_validation_auc": fb.validation_auc_, "mfe_heldout_retrieval": fitted.mfe.quality,
    }  # fmt: skip


# Each score asset of the captioner attacks' multi-asset (`families.CAPTIONER_SCORES`): its attack and description.
SCORE_ASSETS = dict(
    zip(
        CAPTIONER_SCORES,
        (
            ("m4i_mb", "MB M^4I (Hu et al. 2022, 3.2): the least restricted shadow's classifier on caption metrics"),
            (
                "m4i_fb",
                "FB M^4I (Hu et al. 2022, 3.3): the least restricted shadow's classifier on |MFE_img - MFE_txt|",
            ),
            (caption_loss.LOSS, "Teacher-forced NLL of the reference caption under the target (white box)"),
            (caption_loss.LOSS_REF, "The caption NLL calibrated by the shadow captioners (OUT for every candidate)"),
        ),
    )
)


def m4i_scores(family: Family):
    """`<family>/m4i_mb_scores`, `m4i_fb_scores`, `m4i_loss_scores`, `m4i_loss_ref_scores` of an audited captioner,
    one step (`captioner_scores`), reading the shadows' attack models and likelihoods (`Family.helper_asset`)."""
    keys = {name: version_key(family, name) for name in SCORE_ASSETS}
    deps = dep_keys(family, ("caption_metrics", "caption_nll", family.helper_asset))

    @multi_asset(
        name=f"{family.name}_m4i_scores",
        specs=[AssetSpec(keys[name], deps=deps, kinds={"duckdb"}, description=text)
               for name, (_, text) in SCORE_ASSETS.items()],
        check_specs=[AssetCheckSpec(name, asset=key, description=text, blocking=blocking) for key in keys.values()
                     for name, (text, blocking) in SCORES_CHECK_SPEC.items()],
        group_name="attacks",
        partitions_def=VERSION_PARTITIONS[family.name],
    )  # fmt: skip
    def _scores(context: AssetExecutionContext, settings: AuditSettings, storage: Storage):
        yield from captioner_scores(storage, settings, context.partition_key, keys)

    return _scores


def attack_skips(storage: Storage, settings: AuditSettings, info: dict, has_shadows: bool) -> dict[str, str]:
    """Why each captioner attack does not run on a version, by attack id: its audit's plan skips it (what the
    audit lacks, or not listed), there are no shadow captioners to learn from, or its release gives captions only
    (the loss attacks read likelihoods, which a sampled-decoding release does not give)."""
    audit = settings.registered_audit(storage.root)
    skips = {r["attack"]: r["reason"] for r in (audit.plan() if audit else []) if r["status"] == "skipped"}
    if not has_shadows:
        no_shadows = "the audit has no shadow captioners (no population records to train them on)"
        learnt = [attack for attack, _ in SCORE_ASSETS.values() if attack != caption_loss.LOSS]
        skips |= {attack: no_shadows for attack in learnt if attack not in skips}
    interface = interface_of(info["family"], info.get("defense"))
    for attack in (caption_loss.LOSS, caption_loss.LOSS_REF):
        if attack not in skips and (why := attack_skip_reason(attack, interface)):
            skips[attack] = why
    return skips


def captioner_scores(storage: Storage, settings: AuditSettings, version: str, keys: dict[str, AssetKey]):
    """The captioner attacks on an audited captioner: `m4i_loss` (white box: the platform holds the checkpoint)
    and, where the audit has shadow captioners, both M^4I attacks once per shadow model, i.e. per threat scenario
    (and per shadow seed), and `m4i_loss_ref` calibrated by each shadow. Every scenario's per-record scores (and the
    M^4I shadow-threshold predictions) go to `m4i_scenario_scores`; the least restricted scenario's first-seed
    MB / FB scores, `m4i_loss` and `m4i_loss_ref` calibrated by every shadow are the `membership_scores` rows (one
    result per asset of `keys`; an attack that cannot run gets a skipped result with its reason)."""
    from m4i_assets.attacks import m4i

    repo = storage.repository
    info = captioner_info(repo, version)
    cands = features(storage, repo, version, settings.caption_metrics)
    known = repo.known_nonmembers(version)
    both = pl.concat([cands["record_id"], known["record_id"]])
    nll = nll_of(storage, version, both)
    # an adaptive attacker's twin learns from the shadows trained with its defense (`defense_facts.references`)
    defended = json.loads(info.get("defense_facts") or "{}").get("references")
    shadows = [
        m
        for m in repo.shadow_models(info["audit"], defended)
        if (m["train_seed"] - settings.seed) // plans.REPEAT < settings.shadow_seeds
    ]
    skips = attack_skips(storage, settings, info, bool(shadows))

    def attacker(shadow: dict) -> m4i.Shadow:
        version_s = shadow["model_version"]
        mb, mfe, fb = (storage.read_attack_model(version_s, name, "m4i_attack_models") for name in ATTACK_FILES)
        return m4i.Shadow(version_s, shadow["train_dataset"], shadow["arch"], shadow["train_seed"],
                          m4i.ShadowClassifier.from_bytes(mb), m4i.Mfe.from_bytes(mfe),
                          m4i.ShadowClassifier.from_bytes(fb), nll_of(storage, version_s, both))  # fmt: skip

    attackers = [attacker(s) for s in shadows]
    metrics = cands.select(settings.caption_metrics).to_numpy()
    scored = m4i.scenario_scores(version, info["train_dataset"], info["arch"], cands, metrics, nll, attackers,
                                 query_captions(cands), settings.seed)  # fmt: skip
    scored = scored.filter(~pl.col("attack").is_in(list(skips)))
    write_signal(storage, "m4i_scenario_scores", version, scored)
    n = cands.height
    own = {caption_loss.LOSS: (caption_loss.loss_scores(nll), "white box")}
    if attackers:
        calibrated = caption_loss.loss_ref_scores(nll, np.stack([a.nll for a in attackers], axis=1))
        own[caption_loss.LOSS_REF] = (calibrated, f"{len(attackers)} shadow captioners")
    for name, (attack, _) in SCORE_ASSETS.items():
        key = keys[name]
        if attack in skips:
            result = skipped_scores(storage, version, attack, skips[attack], asset_key=key)
        elif attack in own:
            values, how = own[attack]
            result = write_scores(storage, info, repo.candidates(version), attack, cands["record_id"], values[:n],
                                  key, (known["record_id"], values[n:]))  # fmt: skip
            result.metadata.update(references=how)
        else:
            rows = m4i.headline_scores(scored, attack)
            result = write_scores(storage, info, repo.candidates(version), attack, rows["record_id"],
                                  rows["score"].to_numpy(), key)  # fmt: skip
            result.metadata.update(shadow_version=rows["shadow_version"][0], classifier=rows["classifier"][0],
                                   scenario=rows["scenario"][0],
                                   scenarios=MetadataValue.json(sorted(set(scored["scenario"]))))  # fmt: skip
        yield result


def mfe_quality(storage: Storage, shadow: str) -> dict:
    """A shadow's MFE retrieval quality on its held-out pairs (`attacks.m4i.retrieval_quality`), as stored with it."""
    from m4i_assets.attacks import m4i

    return m4i.Mfe.from_bytes(storage.read_attack_model(shadow, MFE_FILE, "m4i_attack_models")).quality


def scenario_table(step: Step) -> MaterializeResult:
    """The M^4I scenario table (Hu et al. 2022, section 4.3): both attacks under unrestricted,
    data-restricted, architecture-restricted and doubly restricted shadows, in `m4i_scenarios`, the
    asset metadata and the version's MLflow run."""
    version, settings, storage, tracking = step.version, step.settings, step.storage, step.tracking
    repo = storage.repository
    info = captioner_info(repo, version)
    rows = scenario_rows(load_signal(storage, "m4i_scenario_scores", version), settings.n_bootstrap, settings.seed)
    run_id = repo.mlflow_run(version)
    if run_id is None:
        raise LookupError(f"{version} has no attack_metrics run: materialize attack_metrics first")
    # each shadow's extractor quality beside FB: an FB at chance with an MFE at chance says why
    shadows = sorted(set(load_signal(storage, "m4i_scenario_scores", version)["shadow_version"]) - {"none"})
    extractors = {s: mfe_quality(storage, s) for s in shadows}
    text = report.scenarios_markdown(rows) + "\n\n" + report.extractors_markdown(extractors)
    tracking.log_metrics(run_id, scenario_metrics(rows), {"m4i_scenarios.json": json.dumps(rows, indent=2).encode(),
                                                          "m4i_scenarios.md": text.encode()})  # fmt: skip
    table = pl.DataFrame(rows, infer_schema_length=None).with_columns(
        model_version=pl.lit(version), audit=pl.lit(info["audit"]), target_dataset=pl.lit(info["train_dataset"]),
        target_arch=pl.lit(info["arch"]), mlflow_run_id=pl.lit(run_id),
    )  # fmt: skip
    storage.write("m4i_scenarios", table, model_version=version)
    return MaterializeResult(metadata={
        "dagster/row_count": table.height, "mlflow_run_id": run_id, "scenarios": MetadataValue.md(text),
        "mfe_heldout_retrieval": MetadataValue.json(extractors),
        **{f"{r['attack']}_{r['scenario']}_auc": r["auc"] for r in rows},
    })  # fmt: skip


SIGNALS = frozenset({"pytorch", "parquet"})
VERSION_ASSETS = [
    VersionAsset("generated_captions", caption_version, (TRAINED,), "signals", SIGNALS, gpu=True,
                 checks={"one_caption_per_record": ("one generated caption per queried record, none missing", True)}),
    VersionAsset("caption_metrics", metrics_of_version, ("generated_captions",), "signals", SIGNALS,
                 checks={"finite_metrics": ("one row per captioned record, every configured metric finite", True)}),
    VersionAsset("caption_nll", nll_of_version, (TRAINED,), "signals", SIGNALS, gpu=True,
                 checks={"finite_nll": ("one finite NLL per candidate and known non-member", True)}),
    VersionAsset("m4i_scenarios", scenario_table, (*SCORE_ASSETS, "attack_metrics"), "evaluation",
                 frozenset({"duckdb", "mlflow"})),
]  # fmt: skip
