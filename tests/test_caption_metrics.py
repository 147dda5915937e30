import math

import numpy as np
import pytest

from m4i_assets.data.text import normalise_caption
from m4i_assets.metrics import captions
from m4i_assets.metrics.captions import METRICS, caption_metric_features

BLEU = ("bleu1", "bleu2", "bleu3", "bleu4")
ROUGE = ("rouge1", "rouge2", "rougeL")
PAIRWISE = BLEU + ROUGE  # metrics that do not depend on the other records of the batch


def _one(generated: str, references: list[str], metrics: tuple[str, ...]) -> dict[str, float]:
    return dict(zip(metrics, caption_metric_features([generated], [references], metrics)[0]))


def test_metric_names_in_documented_order():
    assert METRICS == BLEU + ROUGE + ("cider", "meteor")


def test_normalise_caption():
    assert normalise_caption("  A red, CIRCLE!\tleft-of the_square... ") == "a red circle left of the square"
    assert normalise_caption("?!") == ""


def test_identical_caption_scores_one():
    caption = "A large red circle above a small blue square."
    got = _one(caption, [caption.lower()], PAIRWISE)
    for name in PAIRWISE:
        assert got[name] == pytest.approx(1.0, rel=1e-8), name


def test_partial_overlap_matches_hand_computed_values():
    # generated: 7 tokens; reference: 8 tokens. Clipped unigram matches: a, a, red, circle = 4 of 7.
    # Bigram matches: "a red", "red circle" = 2 of 6. Longest common subsequence: "a red circle a" = 4.
    got = _one("a red circle near a green triangle", ["a red circle left of a blue square"], PAIRWISE)
    brevity = math.exp(1 - 8 / 7)  # candidate (7) shorter than the reference (8)
    assert got["bleu1"] == pytest.approx(4 / 7 * brevity, rel=1e-8)
    assert got["bleu2"] == pytest.approx(math.sqrt(4 / 7 * 2 / 6) * brevity, rel=1e-8)

    def f1(p: float, r: float) -> float:
        return 2 * p * r / (p + r)

    assert got["rouge1"] == pytest.approx(f1(4 / 7, 4 / 8), rel=1e-12)  # = 8/15
    assert got["rouge2"] == pytest.approx(f1(2 / 6, 2 / 7), rel=1e-12)  # = 4/13
    assert got["rougeL"] == pytest.approx(f1(4 / 7, 4 / 8), rel=1e-12)


def test_longer_candidate_has_no_brevity_penalty():
    got = _one("a big red circle", ["a red circle"], ("bleu1", "rouge1"))
    assert got["bleu1"] == pytest.approx(3 / 4, rel=1e-8)
    assert got["rouge1"] == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1), rel=1e-12)  # = 6/7


def test_disjoint_caption_scores_zero():
    got = _one("dog runs fast", ["a red circle"], PAIRWISE)
    assert got["bleu1"] == pytest.approx(0.0, abs=1e-12)  # pycocoevalcap smooths 0/3 to ~3e-16
    for name in ROUGE:
        assert got[name] == 0.0


def test_cider_identical_beats_disjoint():
    refs = [
        ["a large red circle above a small blue square"],
        ["two green triangles on a striped background"],
        ["one tiny white star in the top left corner"],
    ]
    generated = [refs[0][0], "an orange hexagon near the middle", "one tiny white star"]
    cider = caption_metric_features(generated, refs, ("cider",))[:, 0]
    assert cider[0] == pytest.approx(10.0, rel=1e-9)  # CIDEr-D: 10 x mean cosine, 1 for each n-gram order
    assert cider[1] == 0.0
    assert cider[0] > cider[2] > cider[1]


def test_cider_of_a_single_record_is_zero():
    # idf = log(number of records) - log(df) is 0 for every n-gram when there is one record.
    caption = "a large red circle above a small blue square"
    assert caption_metric_features([caption], [[caption]], ("cider",))[0, 0] == 0.0


def test_shape_dtype_and_column_order():
    generated = ["a red circle", "a blue square on the left", "green star"]
    references = [["a red circle"], ["a blue square", "the blue square on the left side"], ["a green star"]]
    feats = caption_metric_features(generated, references)
    assert feats.shape == (3, 8) and feats.dtype == np.float64 and np.isfinite(feats).all()
    swapped = caption_metric_features(generated, references, ("rouge1", "bleu1"))
    np.testing.assert_array_equal(swapped, feats[:, [4, 0]])
    np.testing.assert_array_equal(caption_metric_features(generated, references), feats)  # deterministic
    assert caption_metric_features([], []).shape == (0, 8)


def test_multiple_references_are_averaged():
    generated = "a red circle near a green triangle"
    r1, r2 = "a red circle left of a blue square", "the green triangle is near a circle"
    both = _one(generated, [r1, r2], PAIRWISE)
    alone1, alone2 = _one(generated, [r1], PAIRWISE), _one(generated, [r2], PAIRWISE)
    for name in PAIRWISE:
        assert both[name] == pytest.approx((alone1[name] + alone2[name]) / 2, rel=1e-12), name
    assert alone1["rouge1"] != alone2["rouge1"]  # the average is not trivially equal to either


def test_empty_generated_caption_gives_zeros():
    generated = ["", "?!", "a red circle"]
    references = [["a red circle"], ["a blue square"], ["a red circle"]]
    feats = caption_metric_features(generated, references)
    assert (feats[:2] == 0).all()
    assert feats[2, 0] == pytest.approx(1.0, rel=1e-8)


def test_empty_references_are_dropped():
    got = _one("a red circle", ["...", "a red circle"], ("bleu1", "rouge1"))
    assert got == pytest.approx({"bleu1": 1.0, "rouge1": 1.0}, rel=1e-8)


@pytest.mark.parametrize(
    "generated,references,metrics,match",
    [
        (["a"], [["a"]], ("bleu1", "bleu5"), "unknown caption metric"),
        (["a"], [["a"]], "bleu1", "not the string"),
        (["a", "b"], [["a"]], ("bleu1",), "one entry per record"),
        (["a"], [[]], ("bleu1",), "record 0 has no"),
        (["a", "b"], [["a"], ["..."]], ("bleu1",), "record 1 has no"),
        (["a"], ["a"], ("bleu1",), "must be a list"),
    ],
)
def test_invalid_inputs_raise(generated, references, metrics, match):
    with pytest.raises(ValueError, match=match):
        caption_metric_features(generated, references, metrics)


def test_meteor_without_java_raises(monkeypatch):
    monkeypatch.setattr(captions, "java_available", lambda: False)
    with pytest.raises(RuntimeError, match="java"):
        caption_metric_features(["a red circle"], [["a red circle"]], ("meteor",))


def test_meteor_identical_and_disjoint():
    if not captions.java_available():
        pytest.skip("METEOR needs a `java` binary")
    feats = caption_metric_features(
        ["a large red circle above a small blue square", "dog runs fast"],
        [["a large red circle above a small blue square"], ["a red circle"]],
        ("meteor",),
    )
    assert feats[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert feats[1, 0] == 0.0


def test_cider_document_frequencies_fixed_on_a_corpus_do_not_depend_on_the_batch():
    from m4i_assets.metrics.captions import caption_metric_features, cider_corpus

    refs = [["a red circle left of a blue square"], ["a green triangle above a red circle"], ["two blue squares"],
            ["a yellow star"]]  # fmt: skip
    gens = ["a red circle left of a blue square", "a green triangle", "two red squares", "a star"]
    corpus = cider_corpus(refs)
    whole = caption_metric_features(gens, refs, ("cider",), corpus)[:, 0]
    for i in range(len(gens)):  # scored alone against the same corpus: the same value
        alone = caption_metric_features(gens[i : i + 1], refs[i : i + 1], ("cider",), corpus)[0, 0]
        assert alone == pytest.approx(whole[i])
    # without a fixed corpus, a batch's own references set the idf, so values move with the batch
    assert caption_metric_features(gens[:2], refs[:2], ("cider",))[1, 0] != pytest.approx(whole[1])
    np.testing.assert_allclose(caption_metric_features(gens, refs, ("cider",))[:, 0], whole)  # same corpus
