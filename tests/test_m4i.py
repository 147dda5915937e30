"""M^4I attack pieces: scenarios, shadow classifiers, the multimodal feature extractor."""

import json

import numpy as np
import polars as pl
import pytest

from m4i_assets.attacks import m4i
from m4i_assets.data.corpus import CorpusSpec, generate
from m4i_assets.data.roles import shadow_split


def test_scenarios_name_what_the_attacker_guessed():
    assert m4i.scenario_of("coco", "lstm", "coco", "lstm") == "unrestricted"
    assert m4i.scenario_of("coco", "lstm", "flickr", "lstm") == "data_restricted"
    assert m4i.scenario_of("coco", "lstm", "coco", "vit") == "arch_restricted"
    assert m4i.scenario_of("coco", "lstm", "flickr", "vit") == "both_restricted"


def test_shadow_split_halves_the_pool_deterministically():
    ids = [f"r{i:03d}" for i in range(101)]
    members, nonmembers = shadow_split(ids, seed=7)
    assert len(members) == 50 and len(nonmembers) == 51 and not set(members) & set(nonmembers)
    assert sorted(members + nonmembers) == ids
    assert shadow_split(list(reversed(ids)), seed=7) == (members, nonmembers)  # input order does not matter
    assert shadow_split(ids, seed=8) != (members, nonmembers)


def _separable(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = np.r_[rng.normal(shift, 1, (n, 6)), rng.normal(0, 1, (n, 6))]
    return X, np.r_[np.ones(n, bool), np.zeros(n, bool)]


def test_shadow_classifier_transfers_and_round_trips():
    X, y = _separable(300, 0.8, seed=0)
    clf = m4i.ShadowClassifier(("svm",), random_state=0).fit(X, y)
    assert clf.kind_ == "svm" and set(clf.validation_auc_) == {"svm"} and 0.6 < clf.shadow_accuracy_ < 0.9
    X_target, y_target = _separable(200, 0.8, seed=1)  # same distribution: the shadow's threshold transfers
    assert (clf.predict(X_target) == y_target).mean() > 0.8
    again = m4i.ShadowClassifier.from_bytes(clf.to_bytes())
    np.testing.assert_array_equal(again.score_samples(X_target), clf.score_samples(X_target))
    # scores rank like predictions: predicted members score above predicted non-members
    scores, pred = clf.score_samples(X_target), clf.predict(X_target)
    assert scores[pred].min() >= scores[~pred].max()


def test_shadow_classifier_chooses_on_validation_and_is_seeded():
    rng = np.random.default_rng(3)
    X = rng.normal(0, 1, (400, 2))
    y = (X[:, 0] ** 2 + X[:, 1] ** 2) < 1.2  # a ring: no linear model separates it, an MLP does
    clf = m4i.ShadowClassifier(("logreg", "mlp"), random_state=0).fit(X, y)
    assert clf.kind_ == "mlp" and clf.validation_auc_["mlp"] > clf.validation_auc_["logreg"] + 0.2
    twin = m4i.ShadowClassifier(("logreg", "mlp"), random_state=0).fit(X, y)
    np.testing.assert_array_equal(twin.score_samples(X), clf.score_samples(X))
    with pytest.raises(ValueError, match="both members and non-members"):
        m4i.ShadowClassifier().fit(X, np.ones(len(X), bool))
    with pytest.raises(ValueError, match="unknown classifier"):
        m4i.ShadowClassifier(("forest",)).fit(X, y)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mfe")
    rows = [json.loads(line) for line in generate(CorpusSpec(n_records=40, image_size=32, seed=5), root).read_text()
            .splitlines()]  # fmt: skip
    return [str(root / r["image"]) for r in rows], [r["caption"] for r in rows]


def test_mfe_aligns_images_with_their_captions(tiny_corpus):
    uris, captions = tiny_corpus
    spec = m4i.MfeSpec(dim=32, text_hidden=64, epochs=60, batch_size=20, seed=1)
    mfe = m4i.train_mfe(uris, captions, spec, device="cpu")
    own = m4i.fb_features(mfe, uris, captions, batch_size=16)
    assert own.shape == (40, 32) and np.isfinite(own).all() and (own >= 0).all()
    shuffled = m4i.fb_features(mfe, uris, captions[1:] + captions[:1])
    # a matching caption lands nearer its image than another record's caption does
    assert (np.linalg.norm(own, axis=1) < np.linalg.norm(shuffled, axis=1)).mean() > 0.9
    again = m4i.Mfe.from_bytes(mfe.to_bytes())
    np.testing.assert_allclose(m4i.fb_features(again, uris[:5], captions[:5]), own[:5], atol=1e-6)
    twin = m4i.train_mfe(uris, captions, spec, device="cpu")
    assert twin.to_bytes() == mfe.to_bytes()  # seeded: same data, same bytes
    # words the MFE never saw are dropped, not an error; an all-unknown caption is the zero bag
    assert mfe.bag_of_words(["zebra quokka"]).sum() == 0
    # its retrieval quality: recall@k against chance k / n, kept in its bytes (here on its own training pairs)
    quality = m4i.retrieval_quality(mfe, uris, captions)
    assert quality["n_pairs"] == 40 and quality["chance@1"] == 1 / 40 and quality["chance@5"] == 5 / 40
    assert quality["recall@5"] >= quality["recall@1"] > 5 * quality["chance@1"]
    shuffled_quality = m4i.retrieval_quality(mfe, uris, captions[1:] + captions[:1])
    assert shuffled_quality["recall@1"] < quality["recall@1"]
    mfe.quality = quality
    assert m4i.Mfe.from_bytes(mfe.to_bytes()).quality == quality


def test_attacker_split_gives_the_mfe_and_the_fb_classifier_disjoint_halves():
    y = np.r_[np.ones(51, bool), np.zeros(40, bool)]
    mfe, fb = m4i.attacker_split(y, seed=3)
    assert not (mfe & fb).any() and (mfe | fb).all()
    assert y[mfe].sum() == 25 and (~y[mfe]).sum() == 20  # half of each class
    assert (m4i.attacker_split(y, seed=3)[0] == mfe).all() and (m4i.attacker_split(y, seed=4)[0] != mfe).any()


def test_scenario_scores_and_table_from_two_shadows(tiny_corpus):
    """Two shadows trained on the same 40 records (one matching the target, one of another arch): every scenario
    scores every candidate; the headline MB / FB rows are the unrestricted first seed's; the scenario table has
    one row per (attack, scenario) with the attack success rate where there are predictions."""
    from m4i_assets.attacks import caption_loss
    from m4i_assets.metrics.scenarios import scenario_metrics, scenario_rows

    uris, captions = tiny_corpus
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2 == 0
    metrics = rng.normal(y[:, None] * 1.5, 1, (40, 3))
    spec = m4i.MfeSpec(dim=8, text_hidden=16, epochs=2, batch_size=10, seed=1)
    shadows = []
    for arch, seed in (("lstm", 7), ("vit", 8)):
        fitted = m4i.train_attack_models(metrics, uris, captions, captions, y, m4i.ShadowClassifier(("logreg",)),
                                         m4i.ShadowClassifier(("logreg",)), spec, seed, "cpu")  # fmt: skip
        assert not (fitted.mfe_part & fitted.fb_part).any() and fitted.mb.kind_ == fitted.fb.kind_ == "logreg"
        assert fitted.mfe.quality["n_pairs"] == fitted.fb_part.sum()  # measured on the half it never saw
        nll = rng.normal(2, 0.1, 50)
        shadows.append(m4i.Shadow(f"cap-{arch}", "shapes", arch, seed, fitted.mb, fitted.mfe, fitted.fb, nll))
    cands = pl.DataFrame({"record_id": [f"r{i:02d}" for i in range(40)], "image_uri": uris,
                          "generated_caption": captions, "is_member": y})  # fmt: skip
    nll = np.r_[np.where(y, 1.0, 2.0) + rng.normal(0, 0.05, 40), rng.normal(2, 0.05, 10)]
    scored = m4i.scenario_scores("cap-target", "shapes", "lstm", cands, metrics, nll, shadows, [captions], seed=3)
    counts = {(a, s): n for a, s, n in scored.group_by("attack", "scenario").len().iter_rows()}
    assert scored.height == 40 * (1 + 3 * len(shadows)) and set(scored["scenario"]) == {
        "white_box", "unrestricted", "arch_restricted"}  # fmt: skip
    assert all(n == 40 for n in counts.values())
    mb = m4i.headline_scores(scored, m4i.MB)
    assert mb.height == 40 and set(mb["shadow_version"]) == {"cap-lstm"}
    # no shadow of the target's arch (a user's captioner the platform cannot build): the arch-restricted shadow
    restricted = m4i.headline_scores(scored.filter(pl.col("scenario") != "unrestricted"), m4i.MB)
    assert set(restricted["scenario"]) == {"arch_restricted"} and set(restricted["shadow_version"]) == {"cap-vit"}
    with pytest.raises(LookupError, match="no shadow captioners"):
        m4i.headline_scores(scored.filter(pl.col("scenario") == "white_box"), m4i.MB)
    rows = scenario_rows(scored, n_bootstrap=20, seed=0)
    keys = [(r["attack"], r["scenario"]) for r in rows]
    assert keys[:2] == [(m4i.FB, "unrestricted"), (m4i.FB, "arch_restricted")] and keys == sorted(keys, key=lambda k: (
        k[0], ("white_box", *m4i.SCENARIOS).index(k[1])))  # fmt: skip
    by = {(r["attack"], r["scenario"]): r for r in rows}
    assert len(rows) == 7 and by[(caption_loss.LOSS, "white_box")]["auc"] > 0.95  # NLL separates by construction
    assert by[(caption_loss.LOSS, "white_box")]["attack_success_rate"] is None
    assert 0 <= by[(m4i.MB, "unrestricted")]["attack_success_rate"] <= 1
    assert "m4i_mb.unrestricted.auc" in scenario_metrics(rows)
