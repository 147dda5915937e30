import json

import pytest

from m4i_assets.data.corpus import CorpusSpec, generate
from m4i_assets.models.captioner import (
    CaptionerSpec,
    Vocabulary,
    build_captioner,
    generate_captions,
    load_captioner,
    save_captioner,
    tokenize,
    train_captioner,
)
from m4i_assets.models.checkpoints import sha256_file


def test_vocabulary_round_trip_and_unknown_words():
    vocab = Vocabulary.build(["A red circle.", "a blue square, a red star"])
    assert vocab.words[:4] == ("<pad>", "<bos>", "<eos>", "<unk>") and vocab.words[4] == "a"
    ids = vocab.encode("A red, red circle!", max_len=6)
    assert len(ids) == 8 and vocab.decode(ids) == "a red red circle"
    assert vocab.decode(vocab.encode("a green circle", max_len=6)) == "a <unk> circle"
    assert vocab.decode(vocab.encode("a red circle on a square", max_len=3)) == "a red circle"
    assert tokenize("The Star's top-left!") == ["the", "star", "s", "top", "left"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    manifest = generate(CorpusSpec(n_records=12, image_size=32, seed=3), root)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    return [str(root / r["image"]) for r in rows], [r["caption"] for r in rows]


def test_training_memorises_and_checkpoint_round_trips(corpus, tmp_path):
    uris, captions = corpus
    spec = CaptionerSpec(feature_dim=64, embed_dim=64, hidden_dim=128, max_len=40, epochs=80, batch_size=6, lr=3e-3)
    bundle = build_captioner(Vocabulary.build(captions), spec)
    history = train_captioner(bundle, uris, captions, device="cpu")
    assert history[-1] < 0.5 * history[0]
    generated = generate_captions(bundle, uris, batch_size=10, device="cpu")

    def overlap(g: str, c: str) -> float:
        return len(set(tokenize(g)) & set(tokenize(c))) / len(set(tokenize(c)))

    own = [overlap(g, c) for g, c in zip(generated, captions)]
    other = [overlap(g, c) for i, g in enumerate(generated) for j, c in enumerate(captions) if i != j]
    # each image's caption is reproduced better than the other records' captions: image-conditioned memory
    assert sum(own) / len(own) > sum(other) / len(other) + 0.05
    path, sha = save_captioner(bundle, tmp_path / "m", {"role": "test"})
    assert sha == sha256_file(path)
    again = load_captioner(tmp_path / "m")
    assert generate_captions(again, uris[:5], device="cpu") == generated[:5]
    # same spec, same data, same bytes
    twin = build_captioner(Vocabulary.build(captions), spec)
    train_captioner(twin, uris, captions, device="cpu")
    assert save_captioner(twin, tmp_path / "twin", {"role": "test"})[1] == sha


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_captioner(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="config.json"):
        load_captioner(tmp_path)
    with pytest.raises(ValueError, match="architecture"):
        build_captioner(Vocabulary.build(["a"]), CaptionerSpec(arch="transformer"))
