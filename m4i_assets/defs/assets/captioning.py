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

from m4i_assets.attacks import m4i
from m4i_assets.defs.assets.attacks import SCORES_CHECK, write_scores
from m4i_assets.defs.assets.data import schema_of
from m4i_assets.defs.assets.evaluation import attack_metrics
from m4i_assets.defs.assets.models import model_checkpoint, release_of
from m4i_assets.defs.assets.signals import load_signal, signal_asset, write_signal
from m4i_assets.defs.partitions import model_versions
from m4i_assets.defs.resources import Compute, Storage, Tracking
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
    captions = captioner.generate_captions(bundle, recs["image_uri"].to_list(), settings.caption_batch_size,
                                           compute.torch_device, release.temperature, settings.seed)  # fmt: skip
    frame = pl.DataFrame({"model_version": version, "record_id": recs["record_id"], "generated_caption": captions})
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
    from m4i_assets.metrics.captions import caption_metric_features

    version = context.partition_key
    captioner_info(storage, version)
    gen = load_signal(storage, "generated_captions", version).sort("record_id")
    metrics = tuple(settings.caption_metrics)
    values = caption_metric_features(gen["generated_caption"].to_list(), storage.references(gen["record_id"].to_list()),
                                     metrics)  # fmt: skip
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
    caption metrics, the multimodal feature extractor (MFE) on its data and the FB classifier on
    |MFE_img - MFE_txt(generated)|, each a file with its sha256."""
    version = context.partition_key
    info = captioner_info(storage, version)
    if info["role"] != "shadow":
        raise ValueError(f"{version} is a {info['role']} model: attack models are trained on shadow models only")
    data = features(storage, version, settings.caption_metrics)
    y = data["is_member"].to_numpy()
    mb = m4i.ShadowClassifier(tuple(settings.mb_classifiers), settings.mb_svm_c, random_state=settings.seed)
    mb.fit(data.select(settings.caption_metrics).to_numpy(), y)
    uris = data["image_uri"].to_list()
    mfe = m4i.train_mfe(uris, data["caption"].to_list(), settings.mfe_spec(), compute.torch_device)
    fb = m4i.ShadowClassifier(tuple(settings.fb_classifiers), random_state=settings.seed)
    fb.fit(m4i.fb_features(mfe, uris, data["generated_caption"].to_list()), y)
    blobs = {MB_FILE: mb.to_bytes(), MFE_FILE: mfe.to_bytes(), FB_FILE: fb.to_bytes()}
    files = {name: storage.write_attack_model(version, name, blob) for name, blob in blobs.items()}
    return MaterializeResult(metadata={
        "files": MetadataValue.json(files), "n_shadow_members": int(y.sum()), "n_shadow_nonmembers": int((~y).sum()),
        "mb_classifier": mb.kind_, "mb_shadow_accuracy": mb.shadow_accuracy_,
        "fb_classifier": fb.kind_, "fb_shadow_accuracy": fb.shadow_accuracy_,
        "fb_validation_auc": MetadataValue.json(fb.validation_auc_),
    })  # fmt: skip


@multi_asset(
    specs=[
        AssetSpec(attack, deps=[caption_metrics, m4i_attack_models], kinds={"duckdb"}, description=text)
        for attack, text in (
            ("m4i_mb_scores", "MB M^4I (Hu et al. 2022, 3.2): the unrestricted shadow's classifier on caption metrics"),
            ("m4i_fb_scores", "FB M^4I (Hu et al. 2022, 3.3): the unrestricted shadow's classifier on |MFE_img - "
             "MFE_txt|"),
        )
    ],
    check_specs=[
        AssetCheckSpec(SCORES_CHECK, asset=key, blocking=True,
                       description="every candidate scored once, finite, members and non-members present")
        for key in ("m4i_mb_scores", "m4i_fb_scores")
    ],
    group_name="attacks",
    partitions_def=model_versions,
)  # fmt: skip
def m4i_scores(context: AssetExecutionContext, settings: AuditSettings, storage: Storage):
    """Both M^4I attacks on an audited captioner, once per shadow model, i.e. per threat scenario. Every
    scenario's per-record scores and shadow-threshold predictions go to `m4i_scenario_scores`; the
    unrestricted scenario's scores are the `m4i_mb` / `m4i_fb` rows of `membership_scores`."""
    version = context.partition_key
    info = captioner_info(storage, version)
    cands = features(storage, version, settings.caption_metrics)
    metrics = cands.select(settings.caption_metrics).to_numpy()
    uris, generated = cands["image_uri"].to_list(), cands["generated_caption"].to_list()
    frames = []
    for shadow in storage.shadow_models(info["audit"]):
        scenario = m4i.scenario_of(info["train_dataset"], info["arch"], shadow["train_dataset"], shadow["arch"])
        shadow_version = shadow["model_version"]
        mfe = m4i.Mfe.from_bytes(storage.read_attack_model(shadow_version, MFE_FILE, "m4i_attack_models"))
        for attack, name, X in (
            (m4i.MB, MB_FILE, metrics),
            (m4i.FB, FB_FILE, m4i.fb_features(mfe, uris, generated)),
        ):
            clf = m4i.ShadowClassifier.from_bytes(storage.read_attack_model(shadow_version, name, "m4i_attack_models"))
            frames.append(pl.DataFrame({
                "model_version": version, "attack": attack, "scenario": scenario,
                "shadow_version": shadow_version, "shadow_dataset": shadow["train_dataset"],
                "shadow_arch": shadow["arch"], "classifier": clf.kind_, "shadow_accuracy": clf.shadow_accuracy_,
                "record_id": cands["record_id"], "score": clf.score_samples(X),
                "predicted_member": clf.predict(X), "is_member": cands["is_member"],
            }))  # fmt: skip
    if not frames:
        raise LookupError(f"audit {info['audit']!r} has no shadow captioners: materialize shadow_captioners")
    scored = pl.concat(frames)
    unrestricted = scored.filter(pl.col("scenario") == "unrestricted")
    if unrestricted.is_empty():
        raise LookupError(
            f"no shadow captioner matches the target's dataset {info['train_dataset']!r} and arch {info['arch']!r}; "
            "add the arch to `shadow_archs`"
        )
    write_signal(storage, "m4i_scenario_scores", version, scored)
    for key, attack in (("m4i_mb_scores", m4i.MB), ("m4i_fb_scores", m4i.FB)):
        rows = unrestricted.filter(pl.col("attack") == attack)
        result = write_scores(storage, version, attack, rows["record_id"], rows["score"].to_numpy(), asset_key=key)
        result.metadata.update(shadow_version=rows["shadow_version"][0], classifier=rows["classifier"][0],
                               scenarios=MetadataValue.json(sorted(set(scored["scenario"]))))  # fmt: skip
        yield result


def scenario_rows(scored: pl.DataFrame, n_bootstrap: int, seed: int) -> list[dict]:
    """One row per (attack, scenario): AUC and TPR@1%FPR with bootstrap CIs, and the attack success
    rate, the accuracy of the shadow-threshold predictions (the paper's headline figure)."""
    rows = []
    keys = ["attack", "scenario", "shadow_version", "shadow_dataset", "shadow_arch", "classifier", "shadow_accuracy"]
    for group in scored.partition_by(keys, maintain_order=True):
        labels = group["is_member"].to_numpy()
        ev = evaluate_scores(labels, group["score"].to_numpy(), n_bootstrap=n_bootstrap, seed=seed).as_row()
        rows.append({
            **{k: group[k][0] for k in keys},
            **{k: ev[k] for k in ("n_members", "n_nonmembers", "auc", "auc_ci_low", "auc_ci_high", "tpr_at_1pct_fpr",
                                  "tpr_at_1pct_fpr_ci_low", "tpr_at_1pct_fpr_ci_high")},
            "attack_success_rate": float((group["predicted_member"].to_numpy() == labels).mean()),
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["attack"], m4i.SCENARIOS.index(r["scenario"])))


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
         for k in ("auc", "auc_ci_low", "auc_ci_high", "tpr_at_1pct_fpr", "attack_success_rate")},
        {"m4i_scenarios.json": json.dumps(rows, indent=2).encode(), "m4i_scenarios.md": text.encode()},
    )  # fmt: skip
    table = pl.DataFrame(rows).with_columns(
        model_version=pl.lit(version), audit=pl.lit(info["audit"]), target_dataset=pl.lit(info["train_dataset"]),
        target_arch=pl.lit(info["arch"]), mlflow_run_id=pl.lit(run_id),
    )  # fmt: skip
    storage.write("m4i_scenarios", table, model_version=version)
    return MaterializeResult(metadata={
        "dagster/row_count": table.height, "mlflow_run_id": run_id, "scenarios": MetadataValue.md(text),
        **{f"{r['attack']}_{r['scenario']}_success_rate": r["attack_success_rate"] for r in rows},
    })  # fmt: skip


captioning_assets = [generated_captions, caption_metrics, m4i_attack_models, m4i_scores, m4i_scenarios]
