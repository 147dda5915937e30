import json

import numpy as np
import pytest

from m4i_assets.data.corpus import SHAPES, CorpusSpec, generate, zero_shot_prompts, zero_shot_task
from m4i_assets.metrics.utility import (
    caption_utility,
    retrieval_recall,
    zero_shot_accuracy,
)


def _padded(rows: list[list[float]]) -> np.ndarray:
    """Rows extended by one coordinate to unit norm, so cosines with basis vectors are the given values."""
    x = np.array(rows, dtype=np.float64)
    return np.hstack([x, np.sqrt(1.0 - (x**2).sum(axis=1, keepdims=True))])


def _basis(n: int, d: int) -> np.ndarray:
    return np.eye(n, d)


# --- retrieval_recall -----------------------------------------------------------------------------


def test_recall_on_a_hand_built_example():
    # sim[i, j] = image i . text j. Image-to-text ranks of the matching text: 1, 2, 4, 4 (row 3 ties
    # everywhere: pessimistic). Text-to-image (columns): 1, 1, 4, 2.
    image = _padded(
        [
            [0.9, 0.1, 0.2, 0.0],
            [0.5, 0.4, 0.3, 0.05],
            [0.4, 0.35, 0.1, 0.3],
            [0.15, 0.15, 0.15, 0.15],
        ]
    )
    text = _basis(4, 5)
    got = retrieval_recall(image, text, ks=(1, 2, 3, 4))
    assert list(got) == [f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 2, 3, 4)]
    assert got == pytest.approx(
        {
            "i2t_recall@1": 0.25,
            "i2t_recall@2": 0.5,
            "i2t_recall@3": 0.5,
            "i2t_recall@4": 1.0,
            "t2i_recall@1": 0.5,
            "t2i_recall@2": 0.75,
            "t2i_recall@3": 0.75,
            "t2i_recall@4": 1.0,
        }
    )


def test_ties_count_against_the_query():
    emb = np.ones((4, 3))
    got = retrieval_recall(emb, emb, ks=(1, 3, 4))
    assert got["i2t_recall@1"] == got["i2t_recall@3"] == got["t2i_recall@3"] == 0.0
    assert got["i2t_recall@4"] == got["t2i_recall@4"] == 1.0


def test_groups_coco_style():
    # Two images (a, b), two captions each; image rows repeat the image per caption.
    # Image a scores captions [0.45, 0.05, 0.25, 0.15], image b [0.4, 0.3, 0.35, 0.1].
    a, b = [0.45, 0.05, 0.25, 0.15], [0.4, 0.3, 0.35, 0.1]
    image = _padded([a, a, b, b])
    text = _basis(4, 5)
    groups = ["a", "a", "b", "b"]
    got = retrieval_recall(image, text, ks=(1, 2), groups=groups)
    # i2t: a finds its caption 0 first (rank 1); b's best caption (0.35) is beaten by caption 0 (rank 2).
    # t2i over the two distinct images: captions 0 and 2 rank their image first, captions 1 and 3 second.
    assert got == pytest.approx({"i2t_recall@1": 0.5, "i2t_recall@2": 1.0, "t2i_recall@1": 0.5, "t2i_recall@2": 1.0})
    # Without groups every pair stands alone: image-to-text needs the exact caption, and the duplicate
    # image rows compete with each other in text-to-image (a tie with a duplicate counts against).
    alone = retrieval_recall(image, text, ks=(1, 2), groups=None)
    assert alone["i2t_recall@1"] == pytest.approx(0.25)  # only image row 0 (caption 0) is first
    assert alone["t2i_recall@1"] == 0.0


def test_groups_score_a_group_by_its_best_image_row():
    # Group a's two image rows differ (e.g. released with different noise); captions 0, 1 are a's, 2 is b's.
    text = _basis(3, 4)
    groups = ["a", "a", "b"]
    image = _padded([[0.5, 0.1, 0.0], [0.1, 0.6, 0.0], [0.0, 0.3, 0.5]])
    got = retrieval_recall(image, text, ks=(1,), groups=groups)
    # Caption 1 finds a through its second row (0.6 > b's 0.3; a's first row alone, 0.1, would lose).
    assert got == {"i2t_recall@1": 1.0, "t2i_recall@1": 1.0}
    # A wrong group also scores by its best row: caption 2 now prefers a's second row (0.55 > 0.5).
    image = _padded([[0.5, 0.1, 0.0], [0.1, 0.6, 0.55], [0.0, 0.3, 0.5]])
    got = retrieval_recall(image, text, ks=(1,), groups=groups)
    assert got["t2i_recall@1"] == pytest.approx(2 / 3)
    assert got["i2t_recall@1"] == 1.0  # a's second row still ranks its caption 1 (0.6) above caption 2


def test_perfect_embeddings_give_recall_one():
    emb = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    got = retrieval_recall(emb, emb * 3.0)  # scale does not matter: cosine
    assert got == {f"{d}_recall@{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_random_embeddings_give_about_k_over_n():
    rng = np.random.default_rng(1)
    n = 1000
    got = retrieval_recall(rng.standard_normal((n, 64)), rng.standard_normal((n, 64)), ks=(10, 50, 100))
    for k in (10, 50, 100):
        assert got[f"i2t_recall@{k}"] == pytest.approx(k / n, abs=0.035)
        assert got[f"t2i_recall@{k}"] == pytest.approx(k / n, abs=0.035)


def test_recall_is_blockwise_consistent():
    # More rows than one block of queries: same answers as computing pair by pair.
    rng = np.random.default_rng(2)
    n = 1100
    image = rng.standard_normal((n, 16))
    text = image + 1.5 * rng.standard_normal((n, 16))
    got = retrieval_recall(image, text, ks=(1, 5))
    sim = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1)[:, None]).T
    i2t_rank = (sim >= np.diag(sim)[:, None]).sum(axis=1)  # 1 + wrong items >= the right one
    t2i_rank = (sim >= np.diag(sim)[None, :]).sum(axis=0)
    for k in (1, 5):
        assert got[f"i2t_recall@{k}"] == pytest.approx((i2t_rank <= k).mean())
        assert got[f"t2i_recall@{k}"] == pytest.approx((t2i_rank <= k).mean())


def test_recall_rejects_bad_input():
    emb = np.eye(3)
    with pytest.raises(ValueError):
        retrieval_recall(emb, np.eye(4))
    with pytest.raises(ValueError):
        retrieval_recall(emb, emb, ks=(0,))
    with pytest.raises(ValueError):
        retrieval_recall(emb, emb, groups=["a", "b"])


# --- zero_shot_accuracy ---------------------------------------------------------------------------


def test_zero_shot_accuracy_argmax_with_pessimistic_ties_and_unlabelled_rows():
    classes = np.eye(3)
    images = np.array([[1.0, 0.1, 0.0], [0.2, 1.0, 0.0], [0.0, 1.0, 0.9], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    labels = [0, 1, 2, 0, None]  # right, right, wrong (predicts 1), tie between 0 and 1 (wrong), skipped
    assert zero_shot_accuracy(images, classes, labels) == pytest.approx(0.5)


def test_zero_shot_prompt_ensembling():
    image = np.array([[0.6, 0.8]])
    # Class 0's prompts point at (1, 0) and (0, 1), one of them with a large norm: each prompt is
    # normalised, then averaged, so class 0 is (0.71, 0.71), closer to the image than class 1 (0.8, 0.6).
    ensembled = np.array([[[10.0, 0.0], [0.0, 1.0]], [[0.8, 0.6], [0.8, 0.6]]])
    assert zero_shot_accuracy(image, ensembled, [0]) == 1.0
    # The first prompt alone, (1, 0), loses to class 1.
    assert zero_shot_accuracy(image, ensembled[:, 0, :], [0]) == 0.0


def test_zero_shot_accuracy_rejects_bad_input():
    with pytest.raises(ValueError):
        zero_shot_accuracy(np.eye(2), np.eye(2), [None, None])
    with pytest.raises(ValueError):
        zero_shot_accuracy(np.eye(2), np.eye(2), [0, 2])
    with pytest.raises(ValueError):
        zero_shot_accuracy(np.eye(2), np.eye(3), [0, 1])


# --- zero_shot_task and prompts on the real corpus ------------------------------------------------


def _corpus(tmp_path, style: str, n: int = 30) -> list[dict]:
    manifest = generate(CorpusSpec(n_records=n, image_size=16, seed=3, style=style), tmp_path / style)
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_zero_shot_task_labels_the_first_shape(tmp_path):
    rows = _corpus(tmp_path, "default")
    metadata = [json.dumps(r["metadata"], sort_keys=True) for r in rows]
    classes, labels = zero_shot_task(metadata)
    assert classes == list(SHAPES)
    assert labels == [SHAPES.index(r["metadata"]["shapes"][0]) for r in rows]
    for row, label in zip(rows, labels):
        assert classes[label] in row["caption"]  # the caption names the labelled shape
    _, single = zero_shot_task(metadata, single_object=True)
    assert single == [lab if r["metadata"]["n_objects"] == 1 else None for r, lab in zip(rows, labels)]
    assert any(s is None for s in single) and any(s is not None for s in single)


def test_zero_shot_task_sketch_keeps_default_labels(tmp_path):
    rows = _corpus(tmp_path, "sketch", n=10)
    _, labels = zero_shot_task([json.dumps(r["metadata"]) for r in rows])
    assert labels == [SHAPES.index(r["metadata"]["shapes"][0]) for r in rows]


def test_zero_shot_task_missing_metadata():
    bad = [None, "", "not json", "[1, 2]", "{}", '{"shapes": []}', '{"shapes": ["hexagon"]}', '{"shapes": [3]}']
    _, labels = zero_shot_task(bad + ['{"shapes": ["star", "ring"]}'])
    assert labels == [None] * len(bad) + [SHAPES.index("star")]


def test_zero_shot_prompts_use_the_corpus_vocabulary(tmp_path):
    default = zero_shot_prompts(SHAPES)
    assert default[0] == ["a circle", "there is a circle", "the picture shows a circle", "we see a circle",
                          "an image of a circle"]  # fmt: skip
    sketch = zero_shot_prompts(["circle"], style="sketch")
    assert sketch == [["sketch of a disc", "pencil drawing showing a disc", "line art: a disc", "doodle of a disc",
                       "ink study of a disc"]]  # fmt: skip
    shifted = zero_shot_prompts(["ring", "bar"], style="shifted")
    assert shifted[0][:3] == ["ring", "ring top left", "ring top"]
    for prompts in (default, sketch, shifted):
        assert len({len(p) for p in prompts}) == 1  # same number per class: stackable
    # Every word of a prompt is a word of the corpus's captions of that style.
    for style in ("default", "sketch", "shifted"):
        rows = _corpus(tmp_path, style, n=40)
        vocab = {w.strip(":,;|") for r in rows for w in r["caption"].split()}
        present = sorted({s for r in rows for s in r["metadata"]["shapes"]})
        words = {w.strip(":") for p in zero_shot_prompts(present, style=style) for t in p for w in t.split()}
        assert words <= vocab, (style, words - vocab)
    with pytest.raises(ValueError):
        zero_shot_prompts(["hexagon"], style="sketch")
    with pytest.raises(ValueError):
        zero_shot_prompts(SHAPES, style="watercolour")


# --- caption_utility ------------------------------------------------------------------------------


def test_caption_utility_identical_beats_unrelated():
    refs = [
        ["a large red circle in the top left on a plain beige background"],
        ["there is a small blue square at the centre over a navy background that is striped"],
        ["we see a medium green star near the bottom, set against a dotted mint backdrop"],
        ["an image of a purple ring in the right on a checkered sand background"],
    ]
    same = caption_utility([r[0] for r in refs], refs)
    other = caption_utility(["the cat sat on the mat", "dogs run fast", "hello world again", "nothing here"], refs)
    assert list(same) == ["bleu4", "rougeL", "cider"]
    assert same["bleu4"] == pytest.approx(1.0, rel=1e-6)
    assert same["rougeL"] == pytest.approx(1.0)
    for key in same:
        assert same[key] > other[key]
    assert other["rougeL"] < 0.2
    with pytest.raises(ValueError):
        caption_utility([], [])


def test_chance_levels():
    from m4i_assets.metrics.utility import caption_chance, retrieval_chance, zero_shot_chance

    assert retrieval_chance((1, 5), n_texts=200, n_images=100) == {
        "i2t_recall@1": 0.005, "i2t_recall@5": 0.025, "t2i_recall@1": 0.01, "t2i_recall@5": 0.05
    }  # fmt: skip
    assert zero_shot_chance(4) == 0.25
    refs = [["a red circle on the left"], ["a blue square above a green triangle"], ["two yellow stars"]]
    chance = caption_chance(refs)
    assert set(chance) == {"bleu4", "rougeL", "cider"} and all(0 <= v < 0.5 for v in chance.values())
    with pytest.raises(ValueError):
        caption_chance(refs[:1])


def test_retrieval_and_zero_shot_read_the_released_similarities():
    """Utility at the release's interface: rounding every similarity to 0 decimals ties nearly everything, and
    ties count against the query, so the rounded release's recall and accuracy fall where the cosines' do not."""
    rng = np.random.default_rng(4)
    img = rng.standard_normal((60, 16))
    txt = img + 0.3 * rng.standard_normal((60, 16))
    coarse = lambda sim: np.round(sim, 0)  # noqa: E731
    exact = retrieval_recall(img, txt, ks=(1,))
    assert exact["i2t_recall@1"] > 0.9
    assert retrieval_recall(img, txt, ks=(1,), released=lambda sim: sim) == exact
    rounded = retrieval_recall(img, txt, ks=(1,), released=coarse)
    assert rounded["i2t_recall@1"] < 0.5 and rounded["t2i_recall@1"] < 0.5
    classes = img[0] + 0.2 * rng.standard_normal((3, 16))  # three close classes: every cosine rounds to 1
    labels = [0, 1, 2] * 20
    queries = classes[labels] + 0.02 * rng.standard_normal((60, 16))
    assert zero_shot_accuracy(queries, classes, labels) > 0.9
    assert zero_shot_accuracy(queries, classes, labels, released=coarse) < 0.5
