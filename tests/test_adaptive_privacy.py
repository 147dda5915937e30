"""The adaptive attacker's k-query averaging and the empirical epsilon lower bound, on synthetic cases whose
answer is known."""

import io
import math

import numpy as np
import pytest
from PIL import Image
from scipy.optimize import brentq
from scipy.stats import norm

from m4i_assets.attacks.adaptive import average_releases, caption_variants, image_variants, query_key
from m4i_assets.attacks.csa import cosine_similarity
from m4i_assets.defenses.release import noisy_embeddings
from m4i_assets.metrics.evaluation import roc_auc
from m4i_assets.metrics.privacy import clopper_pearson, empirical_epsilon, epsilon_from_rates


def randomized_response(eps: float, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scores of an eps-DP mechanism: a member reports 1 with probability e^eps / (1 + e^eps), a non-member with
    1 / (1 + e^eps); exactly eps-DP (delta 0), and the best test reaches eps."""
    labels = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    p = np.where(labels, math.exp(eps) / (1 + math.exp(eps)), 1 / (1 + math.exp(eps)))
    return labels, (rng.random(2 * n) < p).astype(float)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of the Gaussian mechanism N(mu, 1) vs N(0, 1) at delta (Balle and Wang 2018)."""
    profile = lambda eps: norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta  # noqa: E731
    return brentq(profile, 0, 50)


def test_clopper_pearson_is_exact_and_bounded():
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(0.3085, abs=1e-4))
    low, high = clopper_pearson(5, 10)
    assert low == pytest.approx(0.1871, abs=1e-4) and high == pytest.approx(0.8129, abs=1e-4)
    with pytest.raises(ValueError):
        clopper_pearson(3, 2)


def test_epsilon_from_rates_matches_the_dp_inequalities():
    assert epsilon_from_rates(0.5, 0.5, 0) == 0
    # randomized response at eps = 1: FPR = FNR = 1 / (1 + e)
    rate = 1 / (1 + math.e)
    assert epsilon_from_rates(rate, rate, 0) == pytest.approx(1.0)


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_empirical_epsilon_of_randomized_response_is_below_and_near_the_truth(eps):
    bounds = []
    for seed in range(10):
        labels, scores = randomized_response(eps, 5000, np.random.default_rng(seed))
        bounds.append(empirical_epsilon(labels, scores, delta=0.0, seed=seed).epsilon_lb)
    assert max(bounds) < eps
    assert min(bounds) > 0.7 * eps  # 2,500 + 2,500 measured records resolve most of it


def test_empirical_epsilon_of_the_gaussian_mechanism_is_below_the_truth():
    delta, mu = 1e-5, 2.0
    truth = gaussian_epsilon(mu, delta)
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        labels = np.r_[np.ones(4000, bool), np.zeros(4000, bool)]
        scores = rng.standard_normal(8000) + mu * labels
        bound = empirical_epsilon(labels, scores, delta=delta, seed=seed)
        assert 0 < bound.epsilon_lb < truth
        assert bound.fpr_ci_low <= bound.fpr <= bound.fpr_ci_high
        assert bound.n_members == bound.n_nonmembers == 2000


def test_empirical_epsilon_without_leakage_is_near_zero():
    rng = np.random.default_rng(7)
    labels = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    bound = empirical_epsilon(labels, rng.standard_normal(2000), delta=1e-5)
    assert bound.epsilon_lb < 0.2


def test_empirical_epsilon_rejects_what_it_cannot_bound():
    with pytest.raises(ValueError, match="two members"):
        empirical_epsilon(np.array([True, False, False]), np.array([1.0, 0.0, 0.0]), delta=0)
    with pytest.raises(ValueError, match="NaN"):
        empirical_epsilon(np.array([True, True, False, False]), np.array([1.0, np.nan, 0.0, 0.0]), delta=0)


def test_caption_variants_are_distinct_spellings_of_the_same_words():
    variants = caption_variants("a red circle left of a blue square", 8)
    assert len(set(variants)) == 8 and variants[0] == "a red circle left of a blue square"
    assert {tuple(v.lower().split()) for v in variants} == {tuple("a red circle left of a blue square".split())}
    assert len({query_key(v) for v in variants}) == 8
    assert len(set(caption_variants("circle", 4))) == 4


def test_image_variants_have_other_bytes_and_the_same_pixels():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    variants = image_variants(buf.getvalue(), 6)
    assert len({query_key(v) for v in variants}) == 6
    pixels = [np.asarray(Image.open(io.BytesIO(v)).convert("RGB")) for v in variants]
    assert all(np.array_equal(pixels[0], p) for p in pixels[1:])


def test_k_query_averaging_recovers_the_undefended_auc_against_keyed_noise():
    """Members' image and text embeddings are closer than non-members'; noise keyed on the query hides most of
    it from one query, and 16 variant queries (other keys, same clean embedding) bring most of it back."""
    rng = np.random.default_rng(3)
    n, d = 400, 32
    labels = np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)]
    img = rng.standard_normal((n, d))
    txt = img + np.where(labels[:, None], 0.8, 1.3) * rng.standard_normal((n, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    ids = [f"record-{i}" for i in range(n)]
    clean = roc_auc(labels, cosine_similarity(img, txt))
    sigma = 0.25

    def release(keys, side):
        return noisy_embeddings(img if side == "image" else txt, sigma, seed=11, keys=[f"{side}:{k}" for k in keys])

    naive = roc_auc(labels, cosine_similarity(release(ids, "image"), release(ids, "text")))
    variants = [[query_key(f"{i}#{j}") for i in ids] for j in range(16)]
    averaged_img = average_releases([release(keys, "image") for keys in variants])
    averaged_txt = average_releases([release(keys, "text") for keys in variants])
    adaptive = roc_auc(labels, cosine_similarity(averaged_img, averaged_txt))
    assert clean > 0.85
    assert naive - 0.5 < 0.6 * (clean - 0.5)
    assert adaptive - 0.5 > 0.85 * (clean - 0.5)
    # the same query twice gets the same noise: repeating it gains nothing
    same = average_releases([release(ids, "image")] * 16)
    assert np.allclose(same, release(ids, "image"), atol=1e-6)


def test_empirical_epsilon_picks_the_strongest_attack_on_the_selection_half():
    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(2000, bool), np.zeros(2000, bool)]
    scores = {"noise": rng.standard_normal(4000), "leaky": rng.standard_normal(4000) + 2.5 * labels}
    bound = empirical_epsilon(labels, scores, delta=1e-5)
    assert bound.attack == "leaky" and 0 < bound.epsilon_lb < gaussian_epsilon(2.5, 1e-5)
    assert empirical_epsilon(labels, scores["leaky"], delta=1e-5).attack is None


def test_k_query_caption_metrics_recover_the_auc_sampled_decoding_hides():
    """A synthetic captioner whose per-word confidence in the reference is higher for members: greedy captions
    separate members, one sampled caption per image (the release's draws keyed on the image's bytes) hides
    much of it, and the caption metrics averaged over 16 re-encoded queries bring most of it back."""
    import torch

    from m4i_assets.attacks.adaptive import average_over_queries
    from m4i_assets.defenses.release import Release
    from m4i_assets.metrics.captions import caption_metric_features
    from m4i_assets.models.captioner import SAMPLED_DECODING_TOP_K, sample_next_token

    rng = np.random.default_rng(7)
    n, length, vocab = 300, 8, 40
    labels = np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)]
    words = [f"w{j}" for j in range(vocab)]
    truth = rng.integers(1, vocab, (n, length))  # word 0 is the distractor every image may be captioned with
    confidence = np.where(labels, 0.5, 0.0)[:, None] + rng.normal(0, 0.6, (n, length))  # reference over distractor
    logits = np.zeros((n, length, vocab))
    logits[:, :, 0] = 2.0
    np.put_along_axis(logits, truth[:, :, None], (2.0 + confidence)[:, :, None], axis=2)
    references = [[" ".join(words[j] for j in row)] for row in truth]

    def captions(temperature: float, draws: np.ndarray) -> list[str]:
        steps = [sample_next_token(torch.tensor(logits[:, t]), temperature, SAMPLED_DECODING_TOP_K,
                                   torch.tensor(draws[:, t])) for t in range(length)]  # fmt: skip
        return [" ".join(words[int(s[i])] for s in steps) for i in range(n)]

    def auc(per_query: list[list[str]]) -> float:
        features = average_over_queries([caption_metric_features(c, references, ("bleu1",)) for c in per_query])
        return roc_auc(labels, features[:, 0])

    release = Release("sampled_decoding", 1.0, seed=5)
    keys = [[query_key(f"image-{i}#{j}") for i in range(n)] for j in range(16)]  # 16 encodings of each image
    greedy = auc([captions(0.0, np.zeros((n, length)))])
    naive = auc([captions(1.0, release.decoding_draws(keys[0], length))])
    adaptive = auc([captions(1.0, release.decoding_draws(k, length)) for k in keys])
    assert greedy > 0.75
    assert naive - 0.5 < 0.8 * (greedy - 0.5)
    assert adaptive > naive + 0.05 and adaptive - 0.5 > 0.9 * (greedy - 0.5)
    # asking the same image again gets the same caption: repeating a query gains nothing
    again = release.decoding_draws(list(keys[0]), length)
    assert captions(1.0, again) == captions(1.0, release.decoding_draws(keys[0], length))
