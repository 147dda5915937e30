import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
import transformers
from PIL import Image

from m4i_assets.data.corpus import CorpusSpec, generate
from m4i_assets.models.captioner import (
    CaptionerSpec,
    Vocabulary,
    build_captioner,
    caption_nll,
    generate_captions,
    load_captioner,
    load_image_tensor,
    save_captioner,
    tokenize,
    train_and_save,
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
    # the Hugging Face tokenizer of a vocabulary: same normalisation and ids, without the padding
    tokenizer = vocab.tokenizer()
    for text in ("A red, red circle!", "a GREEN_circle", "The Star's top-left!"):
        assert tokenizer(text)["input_ids"] == [i for i in vocab.encode(text, max_len=10) if i != 0]
    assert tokenizer.batch_decode([vocab.encode("A red circle.", max_len=6)], skip_special_tokens=True) == [
        "a red circle"
    ]


def assert_memorised(generated: list[str], captions: list[str]) -> None:
    """Each image's caption is reproduced better than the other records' captions: image-conditioned memory."""

    def overlap(g: str, c: str) -> float:
        return len(set(tokenize(g)) & set(tokenize(c))) / len(set(tokenize(c)))

    own = [overlap(g, c) for g, c in zip(generated, captions)]
    other = [overlap(g, c) for i, g in enumerate(generated) for j, c in enumerate(captions) if i != j]
    assert sum(own) / len(own) > sum(other) / len(other) + 0.05


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

    assert_memorised(generated, captions)
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
    with pytest.raises(ValueError, match="unknown captioner architecture 'transformer'"):
        build_captioner(Vocabulary.build(["a"]), CaptionerSpec(arch="transformer"))


VIT_SPEC = CaptionerSpec(
    arch="vit-gpt2", width=64, layers=2, heads=4, patch_size=8, max_len=40, epochs=40, batch_size=6, lr=3e-3
)


@pytest.fixture(scope="module")
def vit_gpt2(corpus, tmp_path_factory):
    """A vit-gpt2 trained on the tiny corpus, its training history, captions and saved folder."""
    uris, captions = corpus
    bundle = build_captioner(Vocabulary.build(captions), VIT_SPEC)
    history = train_captioner(bundle, uris, captions, device="cpu")
    folder = tmp_path_factory.mktemp("vit") / "m"
    path, sha = save_captioner(bundle, folder, {"role": "test"})
    return bundle, history, generate_captions(bundle, uris, device="cpu"), folder, path, sha


def test_vit_gpt2_memorises_and_round_trips(corpus, vit_gpt2):
    uris, captions = corpus
    bundle, history, generated, folder, path, sha = vit_gpt2
    assert history[-1] < 0.2 * history[0]
    assert_memorised(generated, captions)
    assert path == folder / "model.safetensors" and sha == sha256_file(path)
    assert {"config.json", "generation_config.json", "tokenizer.json", "preprocessor_config.json", "m4i.json"} <= {
        p.name for p in folder.iterdir()
    }
    again = load_captioner(folder)
    assert again.spec == VIT_SPEC and again.vocab == bundle.vocab
    assert generate_captions(again, uris, device="cpu") == generated
    # training pixels are the saved image processor's: ViT normalisation of the [0, 1] images
    assert torch.equal(again.pixels(uris), bundle.pixels(uris))
    assert torch.allclose(bundle.pixels(uris), (load_image_tensor(uris, 32) - 0.5) / 0.5, atol=1e-6)


def test_train_and_save_in_a_spawn_worker_gives_the_same_bytes(corpus, tmp_path):
    uris, captions = corpus
    spec = CaptionerSpec(arch="vit-gpt2", width=32, layers=1, heads=2, max_len=40, epochs=3, batch_size=6)
    here = train_and_save(spec, uris, captions, tmp_path / "here", {"role": "here"}, device="cpu")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        args = (spec, uris, captions, tmp_path / "worker", {"role": "worker"}, "cpu", torch.get_num_threads())
        assert pool.submit(train_and_save, *args).result() == here


def test_vit_gpt2_folder_is_a_plain_hugging_face_directory(corpus, vit_gpt2, tmp_path):
    uris, captions = corpus
    _, _, generated, folder, _, _ = vit_gpt2
    model = transformers.VisionEncoderDecoderModel.from_pretrained(folder)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    pixels = processor([Image.open(u).convert("RGB") for u in uris[:4]], return_tensors="pt")["pixel_values"]
    ids = model.generate(pixel_values=pixels, do_sample=False, num_beams=1)
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == generated[:4]
    # a user's directory: no m4i-specific file; it generates, and its caption NLL is the model's own loss (labels:
    # the tokenizer's ids, after the decoder start token)
    shutil.copytree(folder, tmp_path / "hf", ignore=shutil.ignore_patterns("m4i.json"))
    user = load_captioner(tmp_path / "hf")
    assert user.vocab is None and user.spec.arch == "vit-gpt2" and user.spec.max_len == VIT_SPEC.max_len
    assert generate_captions(user, uris, device="cpu") == generated
    own = model(pixel_values=pixels[:1], labels=tokenizer(captions[:1], return_tensors="pt")["input_ids"]).loss.item()
    assert caption_nll(user, uris[:1], captions[:1], device="cpu")[0] == pytest.approx(own, abs=1e-4)


def test_bad_hugging_face_directories_are_clear_errors(vit_gpt2, tmp_path):
    folder = vit_gpt2[3]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_captioner(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_captioner(bad)
    shutil.copy(folder / "model.safetensors", bad)
    (bad / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_captioner(bad)
    shutil.copy(folder / "preprocessor_config.json", bad)
    (bad / "m4i.json").write_text("[]")
    with pytest.raises(ValueError, match="m4i.json"):
        load_captioner(bad)


def test_sampled_decoding_is_seeded_and_differs_from_greedy(corpus, vit_gpt2):
    """The sampled-decoding defense: temperature 0 is greedy; a temperature samples top-k tokens, the same seed
    giving the same captions and another seed others, for both architectures."""
    uris, captions = corpus
    cnn = build_captioner(Vocabulary.build(captions), CaptionerSpec(arch="cnn-lstm", max_len=12, seed=3))
    for bundle in (cnn, vit_gpt2[0]):
        greedy = generate_captions(bundle, uris, device="cpu")
        assert generate_captions(bundle, uris, device="cpu", temperature=0.0, seed=5) == greedy
        hot = generate_captions(bundle, uris, device="cpu", temperature=1.5, seed=5)
        assert hot == generate_captions(bundle, uris, device="cpu", temperature=1.5, seed=5)
        assert hot != greedy and hot != generate_captions(bundle, uris, device="cpu", temperature=1.5, seed=6)


def test_vit_gpt2_saved_with_a_processor_loads(corpus, vit_gpt2, tmp_path):
    """A VisionEncoderDecoder directory whose image processor was saved inside a Processor
    (`processor_config.json`, as transformers 5 writes it) loads and captions the same."""
    uris, _ = corpus
    _, _, generated, folder, _, _ = vit_gpt2
    user = tmp_path / "user"
    transformers.VisionEncoderDecoderModel.from_pretrained(folder).save_pretrained(user)
    transformers.TrOCRProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(folder),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
    ).save_pretrained(user)
    assert (user / "processor_config.json").is_file() and not (user / "preprocessor_config.json").exists()
    assert generate_captions(load_captioner(user), uris, device="cpu") == generated
