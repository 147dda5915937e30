"""The scoring of one audited version (`m4i_assets.scoring`): facts read once, signals aligned by record id,
the score rows and their completeness, the registry of attacks."""

import numpy as np
import polars as pl
import pytest

from m4i_assets import scoring
from m4i_assets.settings import PROFILES, AuditSettings
from m4i_assets.storage.home import Home


@pytest.fixture
def audited(tmp_path) -> scoring.Audited:
    home = Home(tmp_path)
    ids = [f"r{i}" for i in range(8)]
    roles = ["member"] * 3 + ["nonmember"] * 3 + ["known_nonmember"] * 2
    home.write("records", pl.DataFrame({"record_id": ids, "dataset": "d", "caption": "c", "image_uri": ids}),
               dataset="d")  # fmt: skip
    home.write("record_roles", pl.DataFrame({"audit": "demo", "record_id": ids, "dataset": "d", "role": roles,
                                             "is_member": [r == "member" for r in roles]}), audit="demo")  # fmt: skip
    home.write("models", pl.DataFrame([{"model_version": "clip-1", "family": "clip", "arch": "a", "role": "target",
                                        "audit": "demo", "checkpoint_uri": "-", "sha256": "-"}]),
               model_version="clip-1")  # fmt: skip
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(8, 4)).astype(np.float32)
    home.warehouse.write_signal("embeddings", "clip-1", pl.DataFrame({
        "model_version": "clip-1", "record_id": list(reversed(ids)), "image_embedding": emb, "text_embedding": emb,
        "cosine_similarity": np.arange(8.0)[::-1]}))  # fmt: skip
    return scoring.Audited(home, AuditSettings(**{**PROFILES["tiny"], "audit": "demo"}), "clip-1")


def test_audited_aligns_signals_and_csa_scores_every_candidate(audited):
    assert audited.cands["record_id"].to_list() == [f"r{i}" for i in range(6)]  # sorted, candidates only
    assert audited.known["record_id"].to_list() == ["r6", "r7"]
    s = scoring.score_csa(audited)
    np.testing.assert_array_equal(s.scores, np.arange(6.0))  # the CS written for each record, by id
    np.testing.assert_array_equal(s.known_scores, [6.0, 7.0])
    frame, known, complete = scoring.score_frames(audited.info, audited.records, "csa", s.ids, s.scores,
                                                  (s.known_ids, s.known_scores))  # fmt: skip
    assert complete and frame.height == 6 and known.height == 2 and set(frame["attack"]) == {"csa"}
    assert scoring.score_summary(frame) == {"mean_score_members": 1.0, "mean_score_nonmembers": 4.0}
    # a missing or non-finite score fails the completeness test instead of being dropped silently
    assert not scoring.score_frames(audited.info, audited.records, "csa", s.ids[:5], s.scores[:5])[2]
    assert not scoring.score_frames(audited.info, audited.records, "csa", s.ids, np.r_[s.scores[:5], np.nan])[2]
    assert audited.interface_skip("wsa") is None  # an undefended CLIP releases embeddings


def test_the_registry_names_each_attack_once():
    assert len({s.attack for s in scoring.SCORERS}) == len({s.key for s in scoring.SCORERS}) == len(scoring.SCORERS)
    assert {s.key for s in scoring.SCORERS if s.by_interface} == {"wsa_scores"}
    assert all(s.description and s.deps for s in scoring.SCORERS)
