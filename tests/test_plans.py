"""The controlled plan: who trains on what, with which seed (m4i_assets.plans)."""

import numpy as np
import polars as pl
import pytest

from m4i_assets.families import FAMILIES
from m4i_assets.metrics.report import target_seed_spread, target_spread_markdown
from m4i_assets.plans import controlled_plan, seed_offset
from m4i_assets.settings import settings_for


def _records(n: int = 40):
    frame = pl.DataFrame({"record_id": [f"r{i:03d}" for i in range(n)], "image_uri": [f"img{i}" for i in range(n)],
                          "caption": [f"caption {i}" for i in range(n)]})  # fmt: skip
    members, population = frame[:10], frame[10:]

    def records(roles, dataset=None):
        return members if roles == ("member",) else population

    return records


def test_every_model_and_draw_of_a_plan_has_its_own_seed_offset():
    offsets = [seed_offset("target", repeat=r) for r in range(3)] + [seed_offset("null_control")]
    offsets += [seed_offset("reference", r) for r in range(64)] + [seed_offset("validation")]
    offsets += [seed_offset("shadow", d, a, r) for d in range(2) for a in range(3) for r in range(3)]
    assert len(offsets) == len(set(offsets))
    assert seed_offset("target") == 0  # the first target keeps the seed (and so the version) it always had


@pytest.mark.parametrize("family", ["clip", "captioner"])
def test_target_seeds_repeat_the_target_on_the_same_members_with_other_seeds(monkeypatch, family):
    monkeypatch.setenv("M4I_SETTINGS", '{"target_seeds": 3}')
    repeated = controlled_plan(FAMILIES[family], settings_for("tiny"), _records())
    monkeypatch.setenv("M4I_SETTINGS", "{}")
    single = controlled_plan(FAMILIES[family], settings_for("tiny"), _records())
    target = FAMILIES[family].models[0]
    jobs = repeated[target]
    assert len(jobs) == 3 and len(single[target]) == 1
    assert all(j.train["record_id"].to_list() == jobs[0].train["record_id"].to_list() for j in jobs)
    assert len({j.spec.seed for j in jobs}) == 3 and len({j.fingerprint for j in jobs}) == 3
    assert jobs[0].fingerprint == single[target][0].fingerprint
    assert [j.fingerprint for j in repeated[FAMILIES[family].models[2]]] == [
        j.fingerprint for j in single[FAMILIES[family].models[2]]
    ]  # helpers do not move


def test_target_seed_spread_gives_mean_and_sd_per_attack_and_says_when_unmeasured():
    rows = [{"attack": "csa", "auc": a, "tpr_at_1pct_fpr": t} for a, t in [(0.8, 0.1), (0.9, 0.3), (0.7, 0.2)]]
    rows.append({"attack": "wsa", "auc": 0.6, "tpr_at_1pct_fpr": None})
    spread = {r["attack"]: r for r in target_seed_spread(rows)}
    assert spread["csa"]["n_seeds"] == 3
    assert spread["csa"]["auc_seed_mean"] == pytest.approx(0.8)
    assert spread["csa"]["auc_seed_std"] == pytest.approx(np.std([0.8, 0.9, 0.7], ddof=1))
    assert spread["csa"]["tpr_at_1pct_fpr_seed_mean"] == pytest.approx(0.2)
    assert spread["wsa"]["auc_seed_std"] is None and spread["wsa"]["tpr_at_1pct_fpr_seed_mean"] is None
    assert "0.800 +- 0.100" in target_spread_markdown(target_seed_spread(rows[:3]))
    assert "unmeasured" in target_spread_markdown(target_seed_spread(rows[3:]))
