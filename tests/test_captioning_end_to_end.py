"""The M^4I captioning audit through Dagster's CLI on the tiny profile (`m4i demo --family captioner`):
captioners, shadows, generated captions, both attacks under four scenarios, tables and MLflow."""

import json

import numpy as np
import pytest
from conftest import defend_in_process, read_only, run_demo
from sklearn.metrics import roc_auc_score

SCENARIOS = {"unrestricted", "data_restricted", "arch_restricted", "both_restricted"}


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    """The captioner demo with its audited versions' captions and likelihoods in two record shards each."""
    home = tmp_path_factory.mktemp("m4i_captioning")
    return home, run_demo(home, "--family", "captioner", settings={"record_shards": 2})


@pytest.fixture()
def db(demo_home):
    yield from read_only(demo_home[0])


def versions(db, role: str) -> list[str]:
    return [r[0] for r in db.execute("SELECT model_version FROM models WHERE role = ? ORDER BY 1", [role]).fetchall()]


def test_captioners_and_shadows_are_registered(db):
    models = db.execute("SELECT role, arch, train_dataset, family FROM models ORDER BY ALL").fetchall()
    assert {m[3] for m in models} == {"captioner"}
    assert sorted((m[0], m[1], m[2]) for m in models if m[0] == "shadow") == [
        ("shadow", arch, dataset)
        for arch in ("cnn-lstm", "vit-gpt2")
        for dataset in ("synthetic_shapes", "synthetic_sketches")
    ]
    assert [(m[0], m[1]) for m in models if m[0] != "shadow"] == [("null_control", "cnn-lstm"), ("target", "cnn-lstm")]


def test_shadow_data_never_touches_a_candidate(db):
    overlap = db.execute(
        """SELECT count(*) FROM shadow_records s JOIN record_roles r USING (record_id)
           WHERE r.role IN ('member', 'nonmember', 'known_nonmember')"""
    ).fetchone()[0]
    assert overlap == 0
    per_shadow = db.execute(
        "SELECT model_version, count(*), sum(is_member::INT) FROM shadow_records GROUP BY 1"
    ).fetchall()
    assert len(per_shadow) == 4 and all(n == 96 and m == 48 for _, n, m in per_shadow)


def test_every_captioner_captioned_what_it_is_queried_on(db, demo_home):
    counts = dict(db.execute("SELECT model_version, count(*) FROM generated_captions GROUP BY 1").fetchall())
    assert {v: counts[v] for v in versions(db, "target") + versions(db, "null_control")} == {
        v: 96 for v in versions(db, "target") + versions(db, "null_control")
    }
    assert all(counts[v] == 96 for v in versions(db, "shadow"))
    for signal, rows in (("generated_captions", [64, 32]), ("caption_nll", [96, 48])):  # 3 and 5 batches of 32
        for version in versions(db, "target") + versions(db, "null_control"):
            files = sorted((demo_home[0] / "signals" / signal).glob(f"{version}.shard-*-of-2.parquet"))
            assert [db.execute(f"SELECT count(*) FROM read_parquet('{f}')").fetchone()[0] for f in files] == rows
        shadow = versions(db, "shadow")[0]  # a helper's signals are computed whole, by the helper asset
        assert (demo_home[0] / "signals" / signal / f"{shadow}.parquet").is_file()
    metrics = db.execute("SELECT count(*), count(bleu4), count(cider) FROM caption_metrics").fetchone()
    assert metrics[0] == metrics[1] == metrics[2] == 6 * 96


def test_scores_metrics_and_scenarios(db):
    for version in versions(db, "target") + versions(db, "null_control"):
        scores = dict(db.execute("SELECT attack, count(*) FROM membership_scores WHERE model_version = ? GROUP BY 1",
                                 [version]).fetchall())  # fmt: skip
        assert scores == {"m4i_mb": 96, "m4i_fb": 96, "m4i_loss": 96, "m4i_loss_ref": 96, "blind_baseline": 96}
        metrics = {r[0] for r in db.execute("SELECT attack FROM attack_metrics WHERE model_version = ?", [version])
                   .fetchall()}  # fmt: skip
        assert metrics == {"m4i_mb", "m4i_fb", "m4i_loss", "m4i_loss_ref", "blind_baseline"}
        rows = db.execute("SELECT attack, scenario, auc, attack_success_rate, n_members, n_nonmembers "
                          "FROM m4i_scenarios WHERE model_version = ?", [version]).fetchall()  # fmt: skip
        assert {(r[0], r[1]) for r in rows} == {(a, s) for a in ("m4i_mb", "m4i_fb", "m4i_loss_ref")
                                                for s in SCENARIOS} | {("m4i_loss", "white_box")}  # fmt: skip
        assert all((r[3] is None) == (r[0] in ("m4i_loss", "m4i_loss_ref")) for r in rows)
        assert all((r[3] is None or 0 <= r[3] <= 1) and r[4] == r[5] == 48 for r in rows)


def test_scenario_figures_recompute_from_stored_scores(db):
    """The table's AUC and success rate follow from the per-record scores and shadow-threshold predictions;
    the unrestricted scores are the ones in membership_scores."""
    for version, attack, scenario, auc, rate in db.execute(
        "SELECT model_version, attack, scenario, auc, attack_success_rate FROM m4i_scenarios"
    ).fetchall():
        labels, scores, predicted = map(np.array, zip(*db.execute(
            "SELECT is_member, score, predicted_member FROM m4i_scenario_scores WHERE model_version = ? AND attack = ?"
            " AND scenario = ? ORDER BY record_id", [version, attack, scenario]).fetchall()))  # fmt: skip
        assert roc_auc_score(labels, scores) == pytest.approx(auc, abs=1e-12)
        if rate is not None:
            assert (labels == predicted).mean() == pytest.approx(rate)
        if scenario == "unrestricted" and attack != "m4i_loss_ref":  # its membership scores use every shadow
            stored = [r[0] for r in db.execute(
                "SELECT score FROM membership_scores WHERE model_version = ? AND attack = ? ORDER BY record_id",
                [version, attack]).fetchall()]  # fmt: skip
            np.testing.assert_allclose(stored, scores)


def test_demo_prints_the_scenario_table_and_mlflow_has_it(demo_home, db):
    from mlflow.tracking import MlflowClient

    assert "scenario" in demo_home[1] and "both_restricted" in demo_home[1]
    client = MlflowClient(f"sqlite:///{demo_home[0] / 'mlflow.db'}")
    for version, run_id, rate in db.execute("SELECT model_version, mlflow_run_id, attack_success_rate FROM "
                                            "m4i_scenarios WHERE attack = 'm4i_fb' AND scenario = 'unrestricted'"
                                            ).fetchall():  # fmt: skip
        run = client.get_run(run_id)
        assert run.data.tags["model_version"] == version
        assert run.data.metrics["m4i_fb.unrestricted.attack_success_rate"] == pytest.approx(rate)
        assert {"m4i_scenarios.json", "m4i_scenarios.md", "audit_report.md"} <= {
            a.path for a in client.list_artifacts(run_id)}  # fmt: skip


def test_defended_captioners_are_audited_and_set_against_utility(demo_home):
    """A DP-SGD retraining and a sampled-decoding release of the captioner target, judged by m4i_mb and
    m4i_fb (and, where the release gives likelihoods, the loss attacks), with BLEU-4 / ROUGE-L / CIDEr on the
    non-members, in the privacy-utility table; the sampled release's k-query attacker as a row of its own."""
    home = demo_home[0]
    defended, evaluation = defend_in_process(home, "captioner", {"dp_sgd": [1.0], "sampled_decoding": [1.0]})
    db = next(read_only(home))
    try:
        (target,) = db.execute("SELECT model_version FROM models WHERE role = 'target'").fetchone()
        rows = db.execute("SELECT model_version, defense, defense_facts FROM models WHERE role = 'defended' "
                          "ORDER BY defense, model_version").fetchall()  # fmt: skip
        assert [r[1] for r in rows] == ["dp_sgd", "dp_sgd", "sampled_decoding", "sampled_decoding"]
        assert sorted(defended) == sorted(r[0] for r in rows)
        assert 0 < json.loads(rows[0][2])["dp"]["epsilon"] < float("inf")
        # DP-SGD's adaptive attacker: the same checkpoint, its shadows trained with DP-SGD at the same noise
        twin = json.loads(rows[1][2])
        assert rows[1][0] == rows[0][0] + "+adaptive" and twin["naive_version"] == rows[0][0]
        shadows = db.execute("SELECT model_version, defense, defense_strength, arch FROM models WHERE role = "
                             "'defended_shadow' ORDER BY 1").fetchall()  # fmt: skip
        assert [s[0] for s in shadows] == twin["references"]
        assert {s[1:] for s in shadows} == {("dp_sgd", 1.0, "cnn-lstm")}
        used = db.execute("SELECT DISTINCT shadow_version FROM m4i_scenario_scores WHERE model_version = ? AND "
                          "shadow_version <> 'none'", [rows[1][0]]).fetchall()  # fmt: skip
        assert sorted(u[0] for u in used) == twin["references"]
        naive_mb, adaptive_mb = (db.execute("SELECT score FROM membership_scores WHERE model_version = ? AND attack = "
                                            "'m4i_loss_ref' ORDER BY record_id", [v]).pl()["score"].to_numpy()
                                 for v in (rows[0][0], rows[1][0]))  # fmt: skip
        assert not np.allclose(naive_mb, adaptive_mb)  # calibrated by the DP shadow, not the undefended ones
        rows = [rows[0], *rows[2:]]
        naive, adaptive = rows[1][0], rows[2][0]
        assert json.loads(rows[2][2])["naive_version"] == naive and adaptive.endswith("+k=2")
        sampled, greedy = (db.execute("SELECT generated_caption FROM generated_captions WHERE model_version = ? "
                                      "ORDER BY record_id", [v]).fetchall() for v in (naive, target))  # fmt: skip
        assert len(sampled) == len(greedy) and sampled != greedy
        # the k-query attacker's first query is the naive one (same bytes, same draws), its second another encoding
        queried = db.execute("SELECT generated_caption, query_captions FROM generated_captions WHERE model_version = ? "
                             "ORDER BY record_id", [adaptive]).fetchall()  # fmt: skip
        assert [(c,) for c, _ in queried] == sampled and all(len(q) == 2 and q[0] == c for c, q in queried)
        assert any(q[0] != q[1] for _, q in queried)
        table = db.execute("SELECT DISTINCT defense, attack, utility_metric FROM defense_evaluations").fetchall()
        assert {(r[0], r[1]) for r in table} == {(d, a) for d in ("none", "dp_sgd")
                                                 for a in ("m4i_mb", "m4i_fb", "m4i_loss", "m4i_loss_ref")} | {
            ("sampled_decoding", a) for a in ("m4i_mb", "m4i_fb")}  # fmt: skip
        # the loss attacks need likelihoods, which a captions-only release does not give: skipped, with the reason
        for version in (naive, adaptive):
            plan = db.execute("SELECT attack, status, reason FROM audit_plan WHERE model_version = ? ORDER BY 1",
                              [version]).fetchall()  # fmt: skip
            assert [(a, s) for a, s, _ in plan] == [("m4i_loss", "skipped"), ("m4i_loss_ref", "skipped")]
            assert all("needs likelihoods" in why for _, _, why in plan)
        assert {r[2] for r in table} == {"cider"}
        metrics = {
            m for (m,) in db.execute("SELECT metric FROM model_utility WHERE model_version = ?", [target]).fetchall()
        }
        assert metrics == {"bleu4", "rougeL", "cider"}
        judged = db.execute("SELECT DISTINCT defense, attacker, epsilon_is_guarantee, epsilon_lb, utility_chance "
                            "FROM defense_evaluations ORDER BY defense, attacker").fetchall()  # fmt: skip
        assert [(r[0], r[1], r[2]) for r in judged] == [("dp_sgd", "adaptive", True), ("dp_sgd", "naive", True),
                                                        ("none", "naive", None),
                                                        ("sampled_decoding", "adaptive", None),
                                                        ("sampled_decoding", "naive", None)]  # fmt: skip
        assert all(r[3] is not None and r[3] >= 0 and r[4] is not None and r[4] >= 0 for r in judged)
    finally:
        db.close()
    (check,) = evaluation.get_asset_check_evaluations()
    assert check.passed
