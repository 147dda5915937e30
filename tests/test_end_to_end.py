"""The whole asset graph, materialized through Dagster's CLI and multiprocess executor (as `make demo`
does) on the tiny profile, then checked table by table."""

import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import CLIP_ATTACKS as ATTACKS
from conftest import defend_in_process, read_only
from sklearn.metrics import roc_auc_score, roc_curve

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def db(demo_home):
    yield from read_only(demo_home[0])


def test_demo_prints_the_headline_table_and_verdicts(demo_home):
    stdout = demo_home[1]
    assert "AUC [95% CI]" in stdout and "TPR@1%FPR" in stdout
    table = [line.split()[2] for line in stdout.splitlines() if len(line.split()) > 2]
    for attack in ATTACKS:
        assert table.count(attack) == 2, attack  # target and null control
    assert stdout.count("shift gate passed") == 2
    assert "| clip_loss | csa | AUC |" in stdout  # the paired comparisons
    assert "label permutation test of" in stdout


def test_tables_follow_the_contract(db):
    datasets = dict(db.execute("SELECT dataset, count(*) FROM records GROUP BY dataset").fetchall())
    assert datasets == {"synthetic_shapes": 240, "synthetic_sketches": 96}  # the second caption domain too
    assert db.execute("SELECT count(*) FROM rejects").fetchone()[0] == 0
    roles = dict(db.execute("SELECT role, count(*) FROM record_roles GROUP BY role").fetchall())
    assert roles == {"member": 48, "nonmember": 48, "known_nonmember": 48, "population": 96 + 96}
    models = dict(db.execute("SELECT role, list(model_version) FROM models GROUP BY role").fetchall())
    assert {r: len(v) for r, v in models.items()} == {"target": 1, "null_control": 1, "reference": 2}
    for version in models["reference"]:
        n_emb = db.execute("SELECT count(*) FROM embeddings WHERE model_version = ?", [version]).fetchone()
        assert n_emb[0] == 144
    for version in models["target"] + models["null_control"]:
        scores = dict(db.execute("SELECT attack, count(*) FROM membership_scores WHERE model_version = ? "
                                 "GROUP BY attack", [version]).fetchall())  # fmt: skip
        assert scores == {attack: 96 for attack in ATTACKS}
        deltas = db.execute("SELECT count(DISTINCT transform), count(*) FROM augmentation_deltas "
                            "WHERE model_version = ?", [version]).fetchone()  # fmt: skip
        assert deltas[0] >= 8 and deltas[1] == (96 + 48) * deltas[0]  # candidates and known non-members
        labels = db.execute("SELECT count(*), count(DISTINCT tau) FROM pseudo_labels WHERE model_version = ?",
                            [version]).fetchone()  # fmt: skip
        assert labels == (96, 1)


def test_models_are_hashed_files(db):
    import hashlib

    for version, uri, sha in db.execute("SELECT model_version, checkpoint_uri, sha256 FROM models").fetchall():
        assert hashlib.sha256(Path(uri).read_bytes()).hexdigest() == sha
        assert version.split("@")[0].endswith(sha[:12])  # `@<audit>` for any audit but the default


def test_attack_metrics_match_sklearn_on_stored_scores(db):
    rows = db.execute(
        "SELECT model_version, attack, auc, tpr_at_1pct_fpr_raw, auc_ci_low, auc_ci_high, tpr_at_1pct_fpr, "
        "tpr_at_1pct_fpr_null_reason FROM attack_metrics"
    ).fetchall()
    assert len(rows) == 2 * len(ATTACKS)
    for version, attack, auc, tpr1, low, high, reported, reason in rows:
        assert reported is None and "48 non-members" in reason  # below ten possible false positives
        labels, scores = map(
            np.array,
            zip(
                *db.execute(
                    "SELECT is_member, score FROM membership_scores WHERE model_version = ? AND attack = ?",
                    [version, attack],
                ).fetchall()
            ),
        )
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert tpr1 == pytest.approx(tpr[fpr <= 0.01].max(), abs=1e-12)
        assert low <= auc <= high


def test_paired_comparisons_and_known_threshold_figures(db):
    comparisons = db.execute("SELECT model_version, attack, baseline, metric, difference, ci_low, ci_high "
                             "FROM attack_comparisons").fetchall()  # fmt: skip
    versions = {r[0] for r in comparisons}
    assert len(versions) == 2
    for version in versions:
        pairs = {(r[1], r[2]) for r in comparisons if r[0] == version}
        assert pairs == {(a, b) for b in ("csa", "blind_baseline") for a in ATTACKS if a != b}
    assert {r[3] for r in comparisons} == {"auc"}  # 48 non-members: no TPR at low FPR to compare
    assert all(lo <= hi for *_, lo, hi in comparisons)
    known = dict(db.execute("SELECT attack, count(*) FROM known_nonmember_scores GROUP BY attack").fetchall())
    assert known == {a: 2 * 48 for a in ATTACKS}
    for lo, tpr, hi, flo, fpr, fhi in db.execute(
        "SELECT known_threshold_tpr_1pct_ci_low, known_threshold_tpr_1pct, known_threshold_tpr_1pct_ci_high, "
        "known_threshold_fpr_1pct_ci_low, known_threshold_fpr_1pct, known_threshold_fpr_1pct_ci_high "
        "FROM attack_metrics"
    ).fetchall():
        assert lo <= tpr <= hi and flo <= fpr <= fhi
    shift = db.execute("SELECT count(*) FROM shift_checks WHERE comparison = 'known_vs_candidate_nonmembers'")
    assert shift.fetchone()[0] == 2


def test_mlflow_run_holds_the_same_auc(demo_home, db):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{demo_home[0] / 'mlflow.db'}")
    for version, attack, auc, run_id in db.execute(
        "SELECT model_version, attack, auc, mlflow_run_id FROM attack_metrics"
    ).fetchall():
        run = client.get_run(run_id)
        assert run.data.metrics[f"{attack}.auc"] == pytest.approx(auc)
        assert run.data.tags["model_version"] == version
        assert {a.path for a in client.list_artifacts(run_id)} >= {
            "roc_loglog.png", "attack_metrics.json", "wsa_attack_model.safetensors", "audit_report.md"}  # fmt: skip


def test_every_sql_file_runs(demo_home):
    conn = duckdb.connect(str(demo_home[0] / "warehouse.duckdb"), read_only=True)  # views over the lake's files
    try:
        for path in sorted((REPO / "sql" / "queries").glob("*.sql")):
            conn.execute(path.read_text())
        top = conn.execute((REPO / "sql/queries/most_exposed_records.sql").read_text()).fetchall()
        assert len(top) == 20 and [r[0] for r in top] == sorted(r[0] for r in top)
        metrics = conn.execute((REPO / "sql/queries/metrics_by_attack.sql").read_text()).fetchall()
        assert len(metrics) == 2 * len(ATTACKS)
    finally:
        conn.close()


def test_dagster_recorded_the_runs(demo_home):
    from dagster import AssetKey, DagsterInstance

    os.environ["DAGSTER_HOME"] = str(demo_home[0] / "dagster")
    try:
        instance = DagsterInstance.get()
        # the audited versions (target, null control) are partitions of the CLIP assets; the references are not
        assert len(instance.get_dynamic_partitions("clip_versions")) == 2
        assert instance.get_dynamic_partitions("captioner_versions") == []
        assert instance.get_latest_materialization_event(AssetKey(["clip", "attack_metrics"])) is not None
        assert instance.get_latest_materialization_event(AssetKey("reference_embeddings")) is not None
    finally:
        del os.environ["DAGSTER_HOME"]


def test_defended_versions_are_audited_and_set_against_utility(demo_home):
    """Defenses on the demo home (before the sensor test, which adds a target): a DP-SGD retraining, an
    embedding-noise release and a similarity-rounding release of the target, each audited by every CLIP attack
    its release interface allows, with utility, in the privacy-utility table, its plot in the metadata."""
    home = demo_home[0]
    defended, evaluation = defend_in_process(home, "clip", {"dp_sgd": [1.0], "embedding_noise": [0.05],
                                                            "similarity_rounding": [2]})  # fmt: skip
    db = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        (target,) = db.execute("SELECT model_version FROM models WHERE role = 'target'").fetchone()
        rows = db.execute("SELECT model_version, defense, defense_strength, base_version, checkpoint_uri, "
                          "defense_facts FROM models WHERE role = 'defended' "
                          "ORDER BY defense, model_version").fetchall()  # fmt: skip
        assert [(r[1], r[2], r[3]) for r in rows] == [("dp_sgd", 1.0, target), ("dp_sgd", 1.0, target),  # naive,
                                                      ("embedding_noise", 0.05, target),  # adaptive (DP references)
                                                      ("embedding_noise", 0.05, target),  # naive, adaptive (k=2)
                                                      ("similarity_rounding", 2.0, target)]  # fmt: skip
        twin = json.loads(rows[1][5])
        assert rows[1][0] == rows[0][0] + "+adaptive" and twin["naive_version"] == rows[0][0]
        assert rows[1][4] == rows[0][4] and twin["dp"] == json.loads(rows[0][5])["dp"]  # same checkpoint, same epsilon
        refs = db.execute("SELECT model_version, defense, defense_strength FROM models WHERE role = "
                          "'defended_reference' ORDER BY 1").fetchall()  # fmt: skip
        assert sorted(twin["references"]) == [r[0] for r in refs] and {(r[1], r[2]) for r in refs} == {("dp_sgd", 1.0)}
        calibrated = {v: db.execute("SELECT score FROM membership_scores WHERE model_version = ? AND attack = "
                                    "'ref_calibrated' ORDER BY record_id", [v]).pl()["score"].to_numpy()
                      for v in (rows[0][0], rows[1][0])}  # fmt: skip
        assert not np.allclose(*calibrated.values())  # calibrated against DP references, not the undefended ones
        registered, rows = [r[0] for r in rows], [rows[0], *rows[2:]]
        assert json.loads(rows[2][5])["naive_version"] == rows[1][0] and rows[2][0].endswith("+k=2")
        dp_facts = json.loads(rows[0][5])["dp"]
        assert 0 < dp_facts["epsilon"] < dp_facts["epsilon_conservative"] and dp_facts["noise_multiplier"] == 1.0
        target_ckpt = db.execute("SELECT checkpoint_uri FROM models WHERE model_version = ?", [target]).fetchone()
        assert rows[1][4] == target_ckpt[0]  # a release-time defense keeps the target's checkpoint
        noisy, clean = (np.stack(db.execute("SELECT image_embedding FROM embeddings WHERE model_version = ? "
                                            "ORDER BY record_id", [v]).pl()["image_embedding"].to_numpy())
                        for v in (rows[1][0], target))  # fmt: skip
        assert np.allclose(np.linalg.norm(noisy, axis=1), 1, atol=1e-5) and not np.allclose(noisy, clean, atol=1e-3)
        table = db.execute("SELECT defense, attack, utility_metric, utility_relative, model_version "
                           "FROM defense_evaluations ORDER BY ALL").fetchall()  # fmt: skip
        assert {(r[0], r[1]) for r in table} == {(d, a) for d in ("none", "dp_sgd", "embedding_noise")
                                                 for a in ATTACKS - {"blind_baseline"}} | {
            ("similarity_rounding", a) for a in ATTACKS - {"blind_baseline", "wsa"}}  # fmt: skip
        # Under the `similarities` interface CSA reads the released, rounded similarity; WSA (needs embeddings)
        # is skipped for that version, with the reason, in audit_plan
        rounded = rows[3][0]
        query = "SELECT score FROM membership_scores WHERE model_version = ? AND attack = 'csa' ORDER BY record_id"
        csa = {v: db.execute(query, [v]).pl()["score"].to_numpy() for v in (target, rounded)}
        assert np.array_equal(csa[rounded], np.round(csa[target], 2)) and not np.array_equal(csa[rounded], csa[target])
        plan = db.execute("SELECT attack, status, reason FROM audit_plan WHERE model_version = ?", [rounded]).fetchall()
        assert [(a, s) for a, s, _ in plan] == [("wsa", "skipped")] and "similarities" in plan[0][2]
        assert not db.execute("SELECT count(*) FROM membership_scores WHERE model_version = ? AND attack = 'wsa'",
                              [rounded]).fetchone()[0]  # fmt: skip
        assert {r[2] for r in table} == {"i2t_recall@5"}
        assert all(r[3] == 1.0 for r in table if r[0] == "none")
        utility = dict(
            db.execute("SELECT metric, value FROM model_utility WHERE model_version = ?", [target]).fetchall()
        )
        assert {"i2t_recall@1", "t2i_recall@10", "zero_shot_accuracy"} <= set(utility)
        n_held, chance = db.execute("SELECT n_records, chance FROM model_utility WHERE model_version = ? AND "
                                    "metric = 'i2t_recall@5'", [target]).fetchone()  # fmt: skip
        assert chance == pytest.approx(min(1, 5 / n_held))
        judged = db.execute("SELECT DISTINCT defense, attacker, epsilon_is_guarantee, epsilon_lb, utility_chance "
                            "FROM defense_evaluations ORDER BY ALL").fetchall()  # fmt: skip
        assert [(r[0], r[1], r[2]) for r in judged] == [
            ("dp_sgd", "adaptive", False), ("dp_sgd", "naive", False), ("embedding_noise", "adaptive", None),
            ("embedding_noise", "naive", None),
            ("none", "naive", None), ("similarity_rounding", "naive", None)]  # fmt: skip
        figures = db.execute("SELECT tpr_at_1pct_fpr, tpr_at_1pct_fpr_null_reason, known_threshold_tpr_1pct, "
                             "known_threshold_tpr_1pct_ci_low, known_threshold_tpr_1pct_ci_high FROM "
                             "defense_evaluations WHERE attack = 'csa'").fetchall()  # fmt: skip
        # 48 non-members: no TPR@1%FPR (the rules of evidence), the known-threshold TPR with its CI instead
        assert all(r[0] is None and "false positives" in r[1] and r[3] <= r[2] <= r[4] for r in figures)
        assert all(r[3] is not None and r[3] >= 0 and r[4] == chance for r in judged)
    finally:
        db.close()
    assert sorted(defended) == sorted(registered)
    (check,) = evaluation.get_asset_check_evaluations()
    assert check.check_name == "every_defense_evaluated" and check.passed
    (event,) = evaluation.get_asset_materialization_events()
    assert "data:image/png;base64" in event.materialization.metadata["clip_plot"].value


def test_a_dropped_checkpoint_is_audited_through_the_sensor(demo_home):
    """Last in this module: it adds a model version. A checkpoint dropped in watched_models/ is picked up
    by one sensor tick and its audit job runs; earlier versions' rows are not recomputed."""
    import time

    from dagster import DagsterInstance, build_sensor_context

    from m4i_assets.defs.definitions import build_definitions
    from m4i_assets.models import clip
    from m4i_assets.settings import settings_for

    home = demo_home[0]
    db = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    before = db.execute("SELECT model_version, attack, computed_at FROM attack_metrics ORDER BY ALL").fetchall()
    db.close()
    clip.save_clip(clip.build_clip("m4i-tiny-vit", seed=7), home / "watched_models" / "dropped", {})
    defs = build_definitions(home=home, settings=settings_for("tiny"))
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    try:
        instance = DagsterInstance.get()
        sensor = defs.resolve_sensor_def("watched_models_sensor")
        resources = {"storage": defs.resources["storage"], "settings": defs.resources["settings"]}
        result = sensor(build_sensor_context(instance=instance, resources=resources,
                                             repository_def=defs.get_repository_def()))  # fmt: skip
        [request] = result.run_requests
        [add] = result.dynamic_partitions_requests
        assert add.partitions_def_name == "clip_versions"
        instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
        version = request.tags["m4i/version"]
        start = time.monotonic()  # the backfill's runs, in process: the version's shard of signals, then its audit
        assert defs.resolve_job_def("clip_signals").execute_in_process(partition_key=f"0|{version}",
                                                                       instance=instance).success  # fmt: skip
        assert defs.resolve_job_def("clip_audit").execute_in_process(partition_key=version, instance=instance).success
        print(f"re-audit of {version}: {time.monotonic() - start:.0f}s")
    finally:
        del os.environ["DAGSTER_HOME"]
    db = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        new = db.execute("SELECT attack FROM attack_metrics WHERE model_version = ?", [version])
        assert {a for (a,) in new.fetchall()} == ATTACKS
        after = db.execute("SELECT model_version, attack, computed_at FROM attack_metrics WHERE model_version <> ? "
                           "ORDER BY ALL", [version]).fetchall()  # fmt: skip
        assert after == before  # nothing recomputed for the earlier versions
    finally:
        db.close()
