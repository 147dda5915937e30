import numpy as np
import pytest
import torch

from m4i_assets.defenses.release import (
    RELEASE_DEFENSES,
    noisy_embeddings,
    round_similarities,
)
from m4i_assets.models.captioner import SAMPLED_DECODING_TOP_K, sample_next_token


def _unit_rows(n: int, d: int, seed: int = 1234) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- noisy_embeddings ---------------------------------------------------------------------------


def test_sigma_zero_is_an_unchanged_copy():
    emb = _unit_rows(5, 8)
    for keys in (None, [f"r{i}" for i in range(5)]):
        out = noisy_embeddings(emb, 0.0, seed=3, keys=keys)
        np.testing.assert_array_equal(out, emb)
        assert out is not emb and not np.shares_memory(out, emb)


def test_output_is_float32_unit_norm_and_changed():
    emb = _unit_rows(20, 16)
    out = noisy_embeddings(emb, 0.1, seed=0)
    assert out.dtype == np.float32 and out.shape == emb.shape
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(out, emb)


def test_larger_sigma_lowers_mean_cosine_monotonically():
    emb = _unit_rows(200, 64)
    cosines = [float((noisy_embeddings(emb, s, seed=1) * emb).sum(axis=1).mean()) for s in (0, 0.01, 0.05, 0.1, 0.3)]
    assert cosines[0] == pytest.approx(1.0, abs=1e-6)
    assert all(a > b for a, b in zip(cosines, cosines[1:])), cosines
    # Expected size: with d = 64 and sigma = 0.3 the noise has norm about 2.4, cosine about 1 / sqrt(1 + 64 * 0.09).
    assert cosines[-1] == pytest.approx(1 / np.sqrt(1 + 64 * 0.09), abs=0.05)


def test_same_seed_same_noise_other_seed_other_noise():
    emb = _unit_rows(10, 8)
    np.testing.assert_array_equal(noisy_embeddings(emb, 0.2, seed=7), noisy_embeddings(emb, 0.2, seed=7))
    assert not np.allclose(noisy_embeddings(emb, 0.2, seed=7), noisy_embeddings(emb, 0.2, seed=8))


def test_keyed_noise_does_not_depend_on_order_or_batch():
    emb = _unit_rows(6, 8)
    keys = [f"record-{i}" for i in range(6)]
    full = noisy_embeddings(emb, 0.3, seed=5, keys=keys)
    perm = np.array([3, 0, 5, 1, 4, 2])
    shuffled = noisy_embeddings(emb[perm], 0.3, seed=5, keys=[keys[i] for i in perm])
    np.testing.assert_array_equal(shuffled, full[perm])
    alone = noisy_embeddings(emb[[4]], 0.3, seed=5, keys=[keys[4]])
    np.testing.assert_array_equal(alone[0], full[4])
    # Without keys the noise follows the row order, so a reordered batch is released differently.
    unkeyed = noisy_embeddings(emb, 0.3, seed=5)
    assert not np.allclose(noisy_embeddings(emb[perm], 0.3, seed=5), unkeyed[perm])
    # Equal keys get equal noise: the same embedding with the same key is released identically.
    twice = noisy_embeddings(np.vstack([emb[0], emb[0]]), 0.3, seed=5, keys=["same", "same"])
    np.testing.assert_array_equal(twice[0], twice[1])


def test_noisy_embeddings_rejects_bad_input():
    emb = _unit_rows(3, 4)
    with pytest.raises(ValueError):
        noisy_embeddings(emb, -0.1, seed=0)
    with pytest.raises(ValueError):
        noisy_embeddings(emb[0], 0.1, seed=0)
    with pytest.raises(ValueError):
        noisy_embeddings(emb, 0.1, seed=0, keys=["a", "b"])
    with pytest.raises(ValueError):
        noisy_embeddings(emb, 0.1, seed=-1)


# --- round_similarities -------------------------------------------------------------------------


def test_round_similarities():
    sim = np.array([[0.31234, -0.0561], [0.99951, 0.125]])
    np.testing.assert_allclose(round_similarities(sim, 2), [[0.31, -0.06], [1.0, 0.12]])  # 0.125: half to even
    np.testing.assert_array_equal(round_similarities(sim, 0), [[0.0, -0.0], [1.0, 0.0]])
    assert round_similarities(sim.astype(np.float32), 3).dtype == np.float32
    np.testing.assert_array_equal(sim, [[0.31234, -0.0561], [0.99951, 0.125]])  # input untouched
    for bad in (-1, 1.5):
        with pytest.raises(ValueError):
            round_similarities(sim, bad)  # type: ignore[arg-type]


# --- registry -------------------------------------------------------------------------------------


def test_registry_names_the_release_defenses():
    assert set(RELEASE_DEFENSES) == {"embedding_noise", "similarity_rounding", "sampled_decoding"}
    assert RELEASE_DEFENSES["embedding_noise"].strength == "sigma"
    assert RELEASE_DEFENSES["similarity_rounding"].strength == "decimals"
    assert RELEASE_DEFENSES["similarity_rounding"].stronger == "smaller"
    assert RELEASE_DEFENSES["sampled_decoding"].strength == "temperature"
    assert RELEASE_DEFENSES["sampled_decoding"].applies_to == "captioner"
    assert str(SAMPLED_DECODING_TOP_K) in RELEASE_DEFENSES["sampled_decoding"].description


# --- sample_next_token ----------------------------------------------------------------------------


def _logits() -> torch.Tensor:
    return torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.0], [3.0, 0.0, 0.5, 2.9, -2.0]])


def _draws(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def test_temperature_zero_and_top_one_are_greedy():
    argmax = torch.tensor([1, 0])
    for temperature, top_k in ((0.0, 10), (-1.0, 3), (5.0, 1)):
        got = sample_next_token(_logits(), temperature, top_k, _draws(2, 0))
        assert got.dtype == torch.int64
        assert torch.equal(got, argmax)


def test_each_rows_token_depends_on_its_own_draw_only():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    draws = _draws(64, 42)
    a = sample_next_token(logits, 1.0, 10, draws)
    assert a.shape == (64,)
    assert torch.equal(a, sample_next_token(logits, 1.0, 10, draws.clone()))
    assert not torch.equal(a, sample_next_token(logits, 1.0, 10, _draws(64, 43)))
    # the first 8 rows alone (another batch) sample the same tokens
    assert torch.equal(a[:8], sample_next_token(logits[:8], 1.0, 10, draws[:8]))
    with pytest.raises(ValueError, match="one draw per row"):
        sample_next_token(logits, 1.0, 10, draws[:3])


def test_high_temperature_spreads_over_the_top_k_only():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0, 0.0]]).repeat(3000, 1)
    got = sample_next_token(logits, 100.0, 3, _draws(3000, 0))
    counts = torch.bincount(got, minlength=6)
    assert counts[3:].sum() == 0  # never outside the top 3
    assert (counts[:3] > 850).all()  # nearly uniform over the top 3 (expected about 1000 each)
    # Top-k larger than the vocabulary: the whole vocabulary.
    wide = sample_next_token(logits, 100.0, 50, _draws(3000, 0))
    assert (torch.bincount(wide, minlength=6) > 0).all()


def test_low_temperature_concentrates_on_the_argmax():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(500, 1)
    got = sample_next_token(logits, 0.05, 3, _draws(500, 0))
    assert (got == 0).all()


def test_sample_next_token_rejects_bad_input():
    with pytest.raises(ValueError):
        sample_next_token(torch.zeros(5), 1.0, 3, _draws(5, 0))
    with pytest.raises(ValueError):
        sample_next_token(torch.zeros(2, 5), 1.0, 0, _draws(2, 0))


def test_each_release_defense_names_the_interface_it_perturbs_and_what_it_rules_out():
    from m4i_assets.defenses.release import INTERFACES, attack_skip_reason, family_attacks_needing
    from m4i_assets.families import FAMILIES

    assert {d: r.interface for d, r in RELEASE_DEFENSES.items()} == {
        "embedding_noise": "embeddings", "similarity_rounding": "similarities", "sampled_decoding": "captions"
    }  # fmt: skip
    assert {f.name: f.interface for f in FAMILIES.values()} == {"clip": "embeddings", "captioner": "likelihoods"}
    assert all(f.interface in INTERFACES for f in FAMILIES.values())
    assert attack_skip_reason("wsa", "embeddings") is None
    assert "needs embeddings" in attack_skip_reason("wsa", "similarities")
    assert attack_skip_reason("csa", "similarities") is None
    # the loss attacks read the captioner's likelihoods: a white-box captioner gives them, sampled captions do not
    for attack in ("m4i_loss", "m4i_loss_ref"):
        assert attack_skip_reason(attack, "likelihoods") is None
        assert "needs likelihoods" in attack_skip_reason(attack, "captions")
    assert attack_skip_reason("m4i_mb", "captions") is None
    assert family_attacks_needing("clip") == ["wsa"]
    assert family_attacks_needing("captioner") == ["m4i_loss", "m4i_loss_ref"]


def test_sampled_decoding_draws_are_keyed_on_the_query():
    """The same image bytes always get the same draws (asking again gains nothing), another encoding others."""
    from m4i_assets.defenses.release import Release

    release = Release("sampled_decoding", 1.0, seed=3)
    a = release.decoding_draws(["k1", "k2"], 7)
    assert a.shape == (2, 7) and ((a >= 0) & (a < 1)).all()
    assert np.array_equal(a[1], release.decoding_draws(["k2"], 7)[0])  # not the position: the key
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, Release("sampled_decoding", 1.0, seed=4).decoding_draws(["k1", "k2"], 7))


def test_the_adaptive_attackers_variant_queries_average_the_noise_away():
    from m4i_assets.defenses.release import Release

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = [f"r{i}" for i in range(50)]
    variants = [[f"r{i}#v{j}" for i in range(50)] for j in range(15)]
    naive = Release("embedding_noise", 0.2, seed=1).embeddings(emb, keys, "image")
    adaptive = Release("embedding_noise", 0.2, seed=1, queries=16).embeddings(emb, keys, "image", variants)
    error = lambda x: np.linalg.norm(x - emb, axis=1).mean()  # noqa: E731
    assert error(adaptive) < 0.4 * error(naive)
    with pytest.raises(ValueError, match="variant key lists"):
        Release("embedding_noise", 0.2, seed=1, queries=16).embeddings(emb, keys, "image", variants[:3])
    assert np.array_equal(Release(queries=16).embeddings(emb, keys, "image", variants), emb)  # no defense


def test_release_noise_is_keyed_on_the_seed_registered_with_the_version():
    """A release-time version keeps the noise it was registered with, whatever the live settings' seed."""
    import json

    from m4i_assets.scoring import release_of

    info = {"defense": "embedding_noise", "defense_strength": 0.1, "defense_facts": json.dumps({"seed": 7})}
    assert release_of(info, seed=0) == release_of(info, seed=123) == release_of({**info, "defense_facts": None}, 7)
    assert release_of({**info, "defense_facts": None}, 0) != release_of(info, 0)
