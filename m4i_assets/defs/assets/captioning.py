"""Captioning assets (M^4I, Hu et al. 2022): per captioner version its generated captions and caption
metrics; per shadow version the attack models it trains; per audited version the MB / FB scores under
every threat scenario and the scenario table.

Shadow versions and audited versions are different partitions: a shadow's attack models are read from
their files when the target is scored, as reference models' signals are for the calibrated CLIP attack.
"""

import json
from pathlib import Path

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)

from m4i_assets.attacks import caption_loss, m4i
from m4i_assets.attacks.adaptive import average_over_queries, image_query_keys
from m4i_assets.defs.assets.attacks import SCORES_CHECK, interface_skip, skipped_scores, write_scores
from m4i_assets.defs.assets.data import schema_of
from m4i_assets.defs.assets.evaluation import attack_metrics
from m4i_assets.defs.assets.models import model_checkpoint, release_of
from m4i_assets.defs.assets.signals import EMBEDDED_ROLES, load_signal, signal_asset, write_signal
from m4i_assets.defs.partitions import model_versions
from m4i_assets.defs.resources import Compute, Storage, Tracking
from m4i_assets.families import SHADOW_ROLES
from m4i_assets.metrics import report
from m4i_assets.metrics.evaluation import evaluate_scores
from m4i_assets.settings import AuditSettings

MB_FILE, MFE_FILE, FB_FILE = "m4i_mb.joblib", "m4i_mfe.safetensors", "m4i_fb.joblib"


def captioner_info(storage: Storage, version: str) -> dict:
    info = storage.model_info(version)
    if info["family"] != "captioner":
        raise ValueError(f"{version} is a {info['family']} model; captioning assets need a captioner version")
    return info


@signal_asset("generated_captions", [model_checkpoint], "one_caption_per_record",
              "one generated caption per queried record, none missing")  # fmt: skip
def generated_captions(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage, compute: Compute
) -> MaterializeResult:
    """Step 1 of both M^4I attacks: the captioner's released caption (greedy; sampled for the sampled-decoding
    defense) for each record it is queried on (the candidates; for a shadow model, its known members and
    non-members), batched."""
    from m4i_assets.models import captioner

    version = context.partition_key
    info = captioner_info(storage, version)
    recs = storage.captioned_records(version)
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
    path = write_signal(storage, "generated_captions", version, frame)
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


@signal_asset("caption_metrics", [generated_captions], "finite_metrics",
              "one row per captioned record, every configured metric finite", gpu=False)  # fmt: skip
def caption_metrics(context: AssetExecutionContext, settings: AuditSettings, storage: Storage) -> MaterializeResult:
    """MB step 2 (M^4I section 3.2): caption metrics of each generated caption against all reference
    captions of its image (BLEU-1..4, ROUGE-1/2/L, CIDEr-D by default; METEOR when configured)."""
    from m4i_assets.metrics.captions import caption_metric_features, cider_corpus

    version = context.partition_key
    captioner_info(storage, version)
    info = storage.model_info(version)
    gen = load_signal(storage, "generated_captions", version).sort("record_id")
    metrics = tuple(settings.caption_metrics)
    # CIDEr-D's document frequencies: fixed once, on the attacker's population references, for shadow and
    # target features alike (not on each call's own records)
    population = storage.audit_records(info["audit"], ("population",))["record_id"].to_list()
    corpus = cider_corpus(storage.references(population)) if "cider" in metrics else None
    references = storage.references(gen["record_id"].to_list())
    queried = query_captions(gen)
    values = average_over_queries([caption_metric_features(q, references, metrics, corpus) for q in queried])
    frame = pl.DataFrame({"model_version": version, "record_id": gen["record_id"]}).with_columns(
        pl.DataFrame(values, schema=list(metrics))
    )
    path = write_signal(storage, "caption_metrics", version, frame)
    truth = storage.captioned_records(version).select("record_id", "is_member")
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


@signal_asset("caption_nll", [model_checkpoint], "finite_nll",
              "one finite NLL per candidate and known non-member")  # fmt: skip
def caption_nll(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage, compute: Compute
) -> MaterializeResult:
    """The teacher-forced negative log-likelihood of each candidate's and known non-member's reference caption
    given its image, under this captioner (`m4i_loss`, `m4i_loss_ref`; for a shadow, its OUT likelihoods)."""
    from m4i_assets.models import captioner

    version = context.partition_key
    info = captioner_info(storage, version)
    recs = storage.audit_records(info["audit"], EMBEDDED_ROLES)
    bundle = captioner.load_captioner(Path(info["checkpoint_uri"]).parent, compute.torch_device)
    nll = captioner.caption_nll(bundle, recs["image_uri"].to_list(), recs["caption"].to_list(),
                                settings.caption_batch_size, compute.torch_device)  # fmt: skip
    frame = pl.DataFrame({"model_version": version, "record_id": recs["record_id"], "nll": nll})
    path = write_signal(storage, "caption_nll", version, frame)
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
        load_signal(storage, "caption_nll", version).select("record_id", "nll"), on="record_id", how="left")
    if frame["nll"].null_count():
        raise ValueError(f"caption_nll of {version} lacks some records of its audit: materialize caption_nll")
    return frame["nll"].to_numpy()


def features(storage: Storage, version: str, metrics: list[str]) -> pl.DataFrame:
    """A captioner's queried records with ground truth, generated caption and caption metrics."""
    return (
        storage.captioned_records(version)
        .join(load_signal(storage, "generated_captions", version).drop("model_version"), on="record_id")
        .join(load_signal(storage, "caption_metrics", version).select("record_id", *metrics), on="record_id")
        .sort("record_id")
    )


@asset(group_name="attacks", partitions_def=model_versions, deps=[caption_metrics], kinds={"pytorch", "sklearn"})
def m4i_attack_models(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage, compute: Compute
) -> MaterializeResult:
    """What one shadow captioner teaches the attacker (M^4I sections 3.2-3.3): the MB classifier on its
    caption metrics, the multimodal feature extractor (MFE) on a seeded half of its records and the FB
    classifier on |MFE_img - MFE_txt(generated)| of the other half (the MFE never embeds a record the FB
    classifier learns from), each a file with its sha256."""
    version = context.partition_key
    info = captioner_info(storage, version)
    if info["role"] not in SHADOW_ROLES:
        raise ValueError(f"{version} is a {info['role']} model: attack models are trained on shadow models only")
    data = features(storage, version, settings.caption_metrics)
    y = data["is_member"].to_numpy()
    mb = m4i.ShadowClassifier(tuple(settings.mb_classifiers), settings.mb_svm_c, random_state=settings.seed)
    mb.fit(data.select(settings.caption_metrics).to_numpy(), y)
    mfe_part, fb_part = m4i.attacker_split(y, settings.seed)
    mfe_data, fb_data = data.filter(pl.Series(mfe_part)), data.filter(pl.Series(fb_part))
    mfe = m4i.train_mfe(mfe_data["image_uri"].to_list(), mfe_data["caption"].to_list(), settings.mfe_spec(),
                        compute.torch_device)  # fmt: skip
    fb = m4i.ShadowClassifier(tuple(settings.fb_classifiers), random_state=settings.seed)
    fb.fit(m4i.fb_features(mfe, fb_data["image_uri"].to_list(), fb_data["generated_caption"].to_list()), y[fb_part])
    blobs = {MB_FILE: mb.to_bytes(), MFE_FILE: mfe.to_bytes(), FB_FILE: fb.to_bytes()}
    files = {name: storage.write_attack_model(version, name, blob) for name, blob in blobs.items()}
    return MaterializeResult(metadata={
        "files": MetadataValue.json(files), "n_shadow_members": int(y.sum()), "n_shadow_nonmembers": int((~y).sum()),
        "mb_classifier": mb.kind_, "mb_shadow_accuracy": mb.shadow_accuracy_,
        "fb_classifier": fb.kind_, "fb_shadow_accuracy": fb.shadow_accuracy_,
        "n_mfe_records": int(mfe_part.sum()), "n_fb_records": int(fb_part.sum()),
        "fb_validation_auc": MetadataValue.json(fb.validation_auc_),
    })  # fmt: skip


SCORE_ASSETS = {
    "m4i_mb_scores": (m4i.MB, "MB M^4I (Hu et al. 2022, 3.2): the unrestricted shadow's classifier on caption metrics"),
    "m4i_fb_scores": (m4i.FB, "FB M^4I (Hu et al. 2022, 3.3): the unrestricted shadow's classifier on |MFE_img - "
                      "MFE_txt|"),
    "m4i_loss_scores": (caption_loss.LOSS, "Teacher-forced NLL of the reference caption under the target (white box)"),
    "m4i_loss_ref_scores": (caption_loss.LOSS_REF, "The caption NLL calibrated by the shadow captioners (OUT for "
                            "every candidate)"),
}
WHITE_BOX = "white_box"  # the scenario of m4i_loss: no shadow, the target's own likelihoods


@multi_asset(
    specs=[AssetSpec(key, deps=[caption_metrics, caption_nll, m4i_attack_models], kinds={"duckdb"}, description=text)
           for key, (_, text) in SCORE_ASSETS.items()],
    check_specs=[
        AssetCheckSpec(SCORES_CHECK, asset=key, blocking=True,
                       description="every candidate scored once, finite, members and non-members present")
        for key in SCORE_ASSETS
    ],
    group_name="attacks",
    partitions_def=model_versions,
)  # fmt: skip
def m4i_scores(context: AssetExecutionContext, settings: AuditSettings, storage: Storage):
    """The captioner attacks on an audited captioner: both M^4I attacks once per shadow model, i.e. per threat
    scenario (and per shadow seed), `m4i_loss` (white box) and `m4i_loss_ref` calibrated by each shadow. Every
    scenario's per-record scores (and the M^4I shadow-threshold predictions) go to `m4i_scenario_scores`; the
    unrestricted scenario's first-seed MB / FB scores, `m4i_loss` and `m4i_loss_ref` calibrated by every shadow
    are the `membership_scores` rows."""
    version = context.partition_key
    info = captioner_info(storage, version)
    cands = features(storage, version, settings.caption_metrics)
    known = storage.audit_records(info["audit"], ("known_nonmember",))
    metrics = cands.select(settings.caption_metrics).to_numpy()
    uris = cands["image_uri"].to_list()
    both = pl.concat([cands["record_id"], known["record_id"]])
    nll = nll_of(storage, version, both)
    # an adaptive attacker's twin learns from the shadows trained with its defense (`defense_facts.references`)
    defended = json.loads(info.get("defense_facts") or "{}").get("references")
    shadows = [m for m in storage.shadow_models(info["audit"], defended)
               if (m["train_seed"] - settings.seed) // 1000 < settings.shadow_seeds]  # fmt: skip
    if not shadows:
        raise LookupError(f"audit {info['audit']!r} has no shadow captioners: materialize shadow_captioners")
    frames, shadow_nll = [], []

    def frame(attack: str, scenario: str, shadow: dict | None, scores: np.ndarray, clf=None, predicted=None):
        return pl.DataFrame({
            "model_version": version, "attack": attack, "scenario": scenario,
            "shadow_version": shadow["model_version"] if shadow else "none",
            "shadow_dataset": shadow["train_dataset"] if shadow else "none",
            "shadow_arch": shadow["arch"] if shadow else "none",
            "shadow_seed": shadow["train_seed"] if shadow else settings.seed,
            "classifier": clf.kind_ if clf else "none",
            "shadow_accuracy": clf.shadow_accuracy_ if clf else None,
            "record_id": cands["record_id"], "score": scores, "predicted_member": predicted,
            "is_member": cands["is_member"],
        }, schema_overrides={"shadow_accuracy": pl.Float64, "predicted_member": pl.Boolean})  # fmt: skip

    frames.append(frame(caption_loss.LOSS, WHITE_BOX, None, caption_loss.loss_scores(nll[: cands.height])))
    for shadow in shadows:
        scenario = m4i.scenario_of(info["train_dataset"], info["arch"], shadow["train_dataset"], shadow["arch"])
        shadow_version = shadow["model_version"]
        mfe = m4i.Mfe.from_bytes(storage.read_attack_model(shadow_version, MFE_FILE, "m4i_attack_models"))
        for attack, name, X in (
            (m4i.MB, MB_FILE, metrics),
            (m4i.FB, FB_FILE, average_over_queries([m4i.fb_features(mfe, uris, q) for q in query_captions(cands)])),
        ):
            clf = m4i.ShadowClassifier.from_bytes(storage.read_attack_model(shadow_version, name, "m4i_attack_models"))
            frames.append(frame(attack, scenario, shadow, clf.score_samples(X), clf, clf.predict(X)))
        shadow_nll.append(nll_of(storage, shadow_version, both))
        ref = caption_loss.loss_ref_scores(nll, shadow_nll[-1][:, None])[: cands.height]
        frames.append(frame(caption_loss.LOSS_REF, scenario, shadow, ref))
    # the loss attacks read likelihoods, which a captions-only release (sampled decoding) does not give
    skips = {a: why for a in (caption_loss.LOSS, caption_loss.LOSS_REF) if (why := interface_skip(storage, version, a))}
    scored = pl.concat(frames).filter(~pl.col("attack").is_in(list(skips)))
    unrestricted_seeds = [s["train_seed"] for s in shadows if m4i.scenario_of(
        info["train_dataset"], info["arch"], s["train_dataset"], s["arch"]) == "unrestricted"]  # fmt: skip
    if not unrestricted_seeds:
        raise LookupError(
            f"no shadow captioner matches the target's dataset {info['train_dataset']!r} and arch {info['arch']!r}; "
            "add the arch to `shadow_archs`"
        )
    first_seed = min(unrestricted_seeds)
    write_signal(storage, "m4i_scenario_scores", version, scored)
    unrestricted = scored.filter((pl.col("scenario") == "unrestricted") & (pl.col("shadow_seed") == first_seed))
    calibrated = caption_loss.loss_ref_scores(nll, np.stack(shadow_nll, axis=1))
    own = {
        caption_loss.LOSS: (caption_loss.loss_scores(nll), "white box"),
        caption_loss.LOSS_REF: (calibrated, f"{len(shadow_nll)} shadow captioners"),
    }
    for key, (attack, _) in SCORE_ASSETS.items():
        if attack in skips:
            result = skipped_scores(storage, version, attack, skips[attack], asset_key=key)
        elif attack in own:
            values, how = own[attack]
            result = write_scores(storage, version, attack, cands["record_id"], values[: cands.height], asset_key=key,
                                  known=(known["record_id"], values[cands.height :]))  # fmt: skip
            result.metadata.update(references=how)
        else:
            rows = unrestricted.filter(pl.col("attack") == attack)
            result = write_scores(storage, version, attack, rows["record_id"], rows["score"].to_numpy(), asset_key=key)
            result.metadata.update(shadow_version=rows["shadow_version"][0], classifier=rows["classifier"][0],
                                   scenarios=MetadataValue.json(sorted(set(scored["scenario"]))))  # fmt: skip
        yield result


def scenario_rows(scored: pl.DataFrame, n_bootstrap: int, seed: int) -> list[dict]:
    """One row per (attack, scenario, shadow dataset and arch): AUC and TPR@1%FPR with bootstrap CIs of the
    first shadow seed, the mean and standard deviation of both over every seed's shadow (training variance),
    and the attack success rate, the accuracy of the shadow-threshold predictions (the paper's headline
    figure; NULL for the likelihood attacks, which have no shadow threshold)."""
    rows = []
    keys = ["attack", "scenario", "shadow_dataset", "shadow_arch"]
    for group in scored.sort("shadow_seed").partition_by(keys, maintain_order=True):
        per_seed = []
        for one in group.partition_by("shadow_seed", maintain_order=True):
            labels = one["is_member"].to_numpy()
            ev = evaluate_scores(labels, one["score"].to_numpy(), n_bootstrap=n_bootstrap, seed=seed).as_row()
            predicted = one["predicted_member"]
            rate = None if predicted.null_count() else float((predicted.to_numpy() == labels).mean())
            per_seed.append((one, ev, rate))
        first, ev, rate = per_seed[0]
        auc_mean, auc_std = report.seed_spread([e["auc"] for _, e, _ in per_seed])
        tpr_mean, tpr_std = report.seed_spread([e["tpr_at_1pct_fpr"] for _, e, _ in per_seed])
        rows.append({
            **{k: first[k][0] for k in (*keys, "shadow_version", "classifier", "shadow_accuracy")},
            **{k: ev[k] for k in ("n_members", "n_nonmembers", "auc", "auc_ci_low", "auc_ci_high", "tpr_at_1pct_fpr",
                                  "tpr_at_1pct_fpr_ci_low", "tpr_at_1pct_fpr_ci_high")},
            "attack_success_rate": rate, "n_seeds": len(per_seed),
            "auc_seed_mean": auc_mean, "auc_seed_std": auc_std,
            "tpr_at_1pct_fpr_seed_mean": tpr_mean, "tpr_at_1pct_fpr_seed_std": tpr_std,
        })  # fmt: skip
    order = (WHITE_BOX, *m4i.SCENARIOS)
    return sorted(rows, key=lambda r: (r["attack"], order.index(r["scenario"]), r["shadow_dataset"], r["shadow_arch"]))


@asset(group_name="evaluation", partitions_def=model_versions, deps=[m4i_scores, attack_metrics],
       kinds={"duckdb", "mlflow"})  # fmt: skip
def m4i_scenarios(
    context: AssetExecutionContext, settings: AuditSettings, storage: Storage, tracking: Tracking
) -> MaterializeResult:
    """The M^4I scenario table (Hu et al. 2022, section 4.3): both attacks under unrestricted,
    data-restricted, architecture-restricted and doubly restricted shadows, in `m4i_scenarios`, the
    asset metadata and the version's MLflow run."""
    version = context.partition_key
    info = captioner_info(storage, version)
    rows = scenario_rows(load_signal(storage, "m4i_scenario_scores", version), settings.n_bootstrap, settings.seed)
    run_id = storage.read("SELECT any_value(mlflow_run_id) AS r FROM attack_metrics WHERE model_version = ?",
                          [version])["r"][0]  # fmt: skip
    if run_id is None:
        raise LookupError(f"{version} has no attack_metrics run: materialize attack_metrics first")
    text = report.scenarios_markdown(rows)
    tracking.log_metrics(
        run_id,
        {f"{r['attack']}.{r['scenario']}.{k}": r[k] for r in rows
         for k in ("auc", "auc_ci_low", "auc_ci_high", "tpr_at_1pct_fpr", "attack_success_rate", "auc_seed_std")
         if r[k] is not None},
        {"m4i_scenarios.json": json.dumps(rows, indent=2).encode(), "m4i_scenarios.md": text.encode()},
    )  # fmt: skip
    table = pl.DataFrame(rows, infer_schema_length=None).with_columns(
        model_version=pl.lit(version), audit=pl.lit(info["audit"]), target_dataset=pl.lit(info["train_dataset"]),
        target_arch=pl.lit(info["arch"]), mlflow_run_id=pl.lit(run_id),
    )  # fmt: skip
    storage.write("m4i_scenarios", table, model_version=version)
    return MaterializeResult(metadata={
        "dagster/row_count": table.height, "mlflow_run_id": run_id, "scenarios": MetadataValue.md(text),
        **{f"{r['attack']}_{r['scenario']}_auc": r["auc"] for r in rows},
    })  # fmt: skip


captioning_assets = [generated_captions, caption_metrics, caption_nll, m4i_attack_models, m4i_scores, m4i_scenarios]
