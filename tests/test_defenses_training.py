"""Training-time defenses (issue 6): DP-SGD with Opacus for the CLIP target and the cnn-lstm captioner, training-time
augmentation, early stopping. Defended checkpoints are ordinary checkpoints of their arch; undefended recipes are
exactly what they were before the defense fields existed."""

import hashlib
import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from m4i_assets.data.corpus import CorpusSpec, generate_pairs
from m4i_assets.models import captioner, clip, dp
from m4i_assets.models.checkpoints import sha256_file
from m4i_assets.models.training import (
    DEFENSE_FIELDS,
    EarlyStopping,
    TrainingDefense,
    augmenter,
    recipe,
    split_pairs,
    validation_split,
)

# sha256 of json.dumps(asdict(spec), sort_keys=True) of the default specs before the defense fields existed
# (what the platform's training fingerprint hashes): `recipe(spec)` must reproduce it for undefended specs.
# CLIP's since its unused `extra` field was deleted (issue 13; it was 44f15ede...).
PRE_DEFENSE_RECIPES = {
    "clip": "0627ee345b4e1ab54ffa6b96a5865f1d5c44ed2c403ad6989c04e3d842d1982d",
    "cnn-lstm": "fa58da652323e59d723cf22b50c75e9c496396d8f307338c1e3d61d632eb379c",
    "vit-gpt2": "2365516ca9f6ec109378262b2d31b6a9b438fcbfccd2853cbe5fa4b7dcb58db2",
}
SMALL_CAPTIONER = {"feature_dim": 32, "embed_dim": 32, "hidden_dim": 64, "max_len": 40, "batch_size": 8}
# Opacus's per-sample hooks on the first layer, whose input needs no gradient: harmless
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these tiny models train faster so on a shared 2-core machine (and bytes are per thread
    count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """40 generated (image uri, caption) pairs of 32 px."""
    return generate_pairs(CorpusSpec(n_records=40, image_size=32), tmp_path_factory.mktemp("corpus"))


def recipe_sha(spec) -> str:
    return hashlib.sha256(json.dumps(recipe(spec), sort_keys=True).encode()).hexdigest()


def embeddings(bundle, uris, captions) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        images = clip.load_images(bundle, uris)
        return bundle.model.encode_image(images), bundle.model.encode_text(bundle.tokenizer(captions))


def test_undefended_specs_are_the_recipes_they_were():
    for name, spec in (("clip", clip.ClipTrainSpec()), ("cnn-lstm", captioner.CaptionerSpec()),
                       ("vit-gpt2", captioner.CaptionerSpec(arch="vit-gpt2"))):  # fmt: skip
        fields = asdict(spec)
        assert {k: fields[k] for k in DEFENSE_FIELDS} == asdict(TrainingDefense())
        assert not spec.defense.active and not spec.defense.dp
        assert recipe_sha(spec) == PRE_DEFENSE_RECIPES[name]
        assert set(recipe(replace(spec, augment=0.5))) == set(recipe(spec)) | {"augment"}
    assert captioner.CaptionerSpec().norm == "batch"
    assert captioner.CaptionerSpec(dp_noise_multiplier=0.0).norm == "group"
    with pytest.raises(ValueError, match="augment"):
        _ = clip.ClipTrainSpec(augment=1.5).defense
    with pytest.raises(ValueError, match="dp_noise_multiplier"):
        _ = captioner.CaptionerSpec(dp_noise_multiplier=-1.0).defense


def test_undefended_training_reports_plain_facts_and_writes_no_defense(pairs, tmp_path):
    uris, captions = pairs
    spec = clip.ClipTrainSpec(epochs=1, batch_size=16, warmup_steps=1)
    first = clip.train_and_save(spec, uris, captions, tmp_path / "a", {"role": "a"}, device="cpu")
    second = clip.train_and_save(spec, uris, captions, tmp_path / "b", {"role": "b"}, device="cpu")
    assert first == second and first[3] == {"n_train": 40, "n_validation": 0, "epochs_trained": 1}
    assert "defense" not in json.loads((tmp_path / "a" / "model.json").read_text())


def test_private_copy_maps_back_onto_the_original_architecture():
    bundle = clip.build_clip("m4i-tiny-vit", seed=0)
    private, frozen = dp.private_copy(bundle.model)
    assert frozen == ["positional_embedding", "text_projection", "logit_scale", "visual.class_embedding",
                      "visual.positional_embedding", "visual.proj"]  # fmt: skip
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in private.modules())
    with torch.no_grad():  # move every trainable weight, then load the private weights into the original arch
        for p in private.parameters():
            p.add_(0.01 * torch.randn_like(p))
    bundle.model.load_state_dict(dp.original_state(private, bundle.model.state_dict()), strict=True)
    images, tokens = torch.rand(3, 3, 32, 32), bundle.tokenizer(["a red disc", "two blue squares", "a star"])
    with torch.no_grad():
        ours, theirs = bundle.model.eval()(images, tokens), private.eval()(images, tokens)
    for a, b in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="batch norm"):
        dp.private_copy(clip.build_clip("m4i-tiny-rn").model)
    with pytest.raises(ValueError, match="batch norm"):
        dp.private_copy(captioner.build_captioner(captioner.Vocabulary.build(["a b"]), captioner.CaptionerSpec()).model)


def test_private_lstm_captioner_maps_back(pairs):
    spec = captioner.CaptionerSpec(dp_noise_multiplier=1.0, **SMALL_CAPTIONER)
    bundle = captioner.build_captioner(captioner.Vocabulary.build(pairs[1]), spec)
    private, frozen = dp.private_copy(bundle.model)
    assert frozen == [] and isinstance(private.lstm, dp.SequenceLSTM)
    with torch.no_grad():
        for p in private.parameters():
            p.add_(0.01 * torch.randn_like(p))
    bundle.model.load_state_dict(dp.original_state(private, bundle.model.state_dict()), strict=True)
    images = captioner.load_image_tensor(pairs[0][:4], 32)
    tokens = torch.tensor([bundle.vocab.encode(c, spec.max_len) for c in pairs[1][:4]])
    with torch.no_grad():
        ours, theirs = bundle.model.eval()(images, tokens), private.eval()(images, tokens)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def per_sample_matches_own_backward(model, inputs, loss_of, k: int) -> None:
    """Opacus's per-sample gradient of sample k through the private copy (the batch's summed loss backpropagated
    once) = the gradient of sample k's loss alone (same batch forward, so the same float path)."""
    from opacus.grad_sample import GradSampleModule

    private, _ = dp.private_copy(model)
    out = GradSampleModule(private, batch_first=True, loss_reduction="sum")(*inputs)
    sum(loss_of(out, i) for i in range(len(inputs[0]))).backward()
    alone, _ = dp.private_copy(model)
    loss_of(alone(*inputs), k).backward()
    for p, q in zip(private.parameters(), alone.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad_sample[k], q.grad, atol=1e-6, rtol=1e-4)


def test_per_sample_gradients_are_each_samples_own(pairs):
    torch.manual_seed(0)
    bundle = clip.build_clip("m4i-tiny-vit", seed=0)
    tokens = bundle.tokenizer(["a red disc", "two blue squares on the left", "a star", "green"])

    def embedding_loss(out, i):  # a loss that decomposes over samples
        return out[0][i : i + 1].pow(2).sum() + out[1][i : i + 1].sum()

    per_sample_matches_own_backward(bundle.model, (torch.rand(4, 3, 32, 32), tokens), embedding_loss, k=1)
    spec = captioner.CaptionerSpec(dp_noise_multiplier=1.0, **{**SMALL_CAPTIONER, "max_len": 10})
    cap = captioner.build_captioner(captioner.Vocabulary.build(pairs[1]), spec)
    tok = torch.tensor([cap.vocab.encode(c, spec.max_len) for c in pairs[1][:4]])

    def caption_loss(out, i):
        return captioner._caption_loss(out[i : i + 1], tok[i : i + 1], True)

    per_sample_matches_own_backward(cap.model, (captioner.load_image_tensor(pairs[0][:4], 32), tok), caption_loss, 1)


def test_dp_clip_trains_saves_loads_and_accounts(pairs, tmp_path):
    uris, captions = pairs
    spec = clip.ClipTrainSpec(epochs=1, batch_size=8, warmup_steps=1, dp_noise_multiplier=0.5)
    sha, history, _, facts = clip.train_and_save(spec, uris, captions, tmp_path / "a", {"role": "a"}, device="cpu")
    again = clip.train_and_save(spec, uris, captions, tmp_path / "b", {"role": "b"}, device="cpu")
    assert again[0] == sha == sha256_file(tmp_path / "a" / "model.safetensors")  # seeded noise and sampling
    facts_dp = facts["dp"]
    assert facts_dp["sample_rate"] == 1 / 5 and facts_dp["steps"] == 5 and facts_dp["expected_batch_size"] == 8
    assert math.isfinite(facts_dp["epsilon"]) and facts_dp["epsilon_conservative"] >= facts_dp["epsilon"] > 0
    assert "NOT a DP guarantee" in facts_dp["epsilon_covers"] and "logit_scale" in facts_dp["frozen_parameters"]
    assert facts_dp["largest_batch"] <= facts_dp["batch_cap"] and facts_dp["cut_batches"] == 0
    assert json.loads((tmp_path / "a" / "model.json").read_text())["defense"]["dp"]["steps"] == 5

    loaded = clip.load_clip(tmp_path / "a" / "model.safetensors")  # the ordinary loader, strict
    assert isinstance(loaded.model, type(clip.build_clip("m4i-tiny-vit").model)) and all(np.isfinite(history))
    initial = clip.build_clip("m4i-tiny-vit", seed=spec.seed).model.state_dict()
    state = loaded.model.state_dict()
    for frozen in ("logit_scale", "token_embedding.weight", "visual.proj"):  # frozen under DP
        assert torch.equal(state[frozen], initial[frozen]) and frozen in facts_dp["frozen_parameters"]
    assert not torch.equal(state["visual.conv1.weight"], initial["visual.conv1.weight"])  # trained

    noisier = clip.train_and_save(replace(spec, dp_noise_multiplier=2.0), uris, captions, tmp_path / "c", {}, "cpu")
    assert noisier[3]["dp"]["epsilon"] < facts_dp["epsilon"] and noisier[0] != sha
    no_noise = clip.train_and_save(replace(spec, dp_noise_multiplier=0.0), uris, captions, tmp_path / "d", {}, "cpu")
    assert no_noise[3]["dp"]["epsilon"] == math.inf

    with pytest.raises(ValueError, match="Hugging Face"):
        clip.train_clip(clip.build_clip("hf-clip-tiny", captions=captions), uris, captions,
                        replace(spec, arch="hf-clip-tiny"), device="cpu")  # fmt: skip


def test_accountant_for_the_demo_recipe():
    # 500 pairs, batch 64, 40 epochs: Poisson rate 1/8 and 320 steps, as `PrivateTraining` sets them up
    q, steps, delta = 1 / 8, 320, 1e-5
    grid = [dp.reported_epsilon(s, q, steps, delta) for s in (0.5, 1.0, 2.0)]
    eps = [g["epsilon"] for g in grid]
    assert eps[0] > eps[1] > eps[2] > 1 and all(g["epsilon_rdp"] >= g["epsilon"] for g in grid)
    cap = dp.batch_cap(500, q, steps, delta)
    assert cap > 62
    conservative = [dp.conservative_epsilon(s, q, steps, cap, delta) for s in (0.5, 1.0, 2.0)]
    assert all(c > 1000 * e for c, e in zip(conservative, eps))  # valid, and very loose


def test_dp_captioner_trains_saves_loads_and_generates(pairs, tmp_path):
    uris, captions = pairs
    spec = captioner.CaptionerSpec(epochs=2, dp_noise_multiplier=1.0, **SMALL_CAPTIONER)
    sha, _, _, facts = captioner.train_and_save(spec, uris, captions, tmp_path / "dp", {"role": "dp"}, device="cpu")
    assert math.isfinite(facts["dp"]["epsilon"]) and "epsilon_conservative" not in facts["dp"]
    assert facts["dp"]["epsilon_covers"].startswith("(epsilon, delta)-DP") and facts["dp"]["frozen_parameters"] == []
    loaded = captioner.load_captioner(tmp_path / "dp")
    assert loaded.spec == spec and isinstance(loaded.model.encoder[1], torch.nn.GroupNorm)
    assert isinstance(loaded.model.lstm, torch.nn.LSTM)
    generated = captioner.generate_captions(loaded, uris[:3], device="cpu")
    assert len(generated) == 3 and all(isinstance(g, str) for g in generated)
    again = captioner.train_and_save(spec, uris, captions, tmp_path / "again", {"role": "dp"}, device="cpu")
    assert again[0] == sha

    vit = captioner.CaptionerSpec(arch="vit-gpt2", width=32, layers=1, heads=2, max_len=40, dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="cnn-lstm"):
        captioner.train_and_save(vit, uris[:8], captions[:8], tmp_path / "vit", {}, device="cpu")


def test_early_stopping_restores_the_best_epoch(pairs, tmp_path):
    uris, captions = pairs
    spec = clip.ClipTrainSpec(epochs=8, batch_size=8, lr=3e-3, warmup_steps=1, early_stopping_patience=1,
                              validation_fraction=0.25)  # fmt: skip
    _, history, _, facts = clip.train_and_save(spec, uris, captions, tmp_path / "es", {}, device="cpu")
    assert facts["n_train"] == 30 and facts["n_validation"] == 10 and len(facts["validation_indices"]) == 10
    assert facts["epochs_trained"] == len(history) <= 8
    assert facts["validation_loss_history"][facts["best_epoch"]] == facts["best_validation_loss"]
    assert facts["restored_best_epoch"]
    # the saved weights are the best epoch's: their validation loss is the best one recorded
    bundle = clip.load_clip(tmp_path / "es" / "model.safetensors")
    held = torch.tensor(facts["validation_indices"])
    images, tokens = clip.load_images(bundle, uris), bundle.tokenizer(captions)
    with torch.no_grad():
        loss = clip._validation_loss(bundle.model, lambda idx, _: images[idx], tokens, held, 8,
                                     clip.open_clip.ClipLoss(), torch.device("cpu"))  # fmt: skip
    assert loss == pytest.approx(facts["best_validation_loss"], abs=1e-5)

    # validation pairs given apart from the training pairs (e.g. population records): every given pair trains
    given = replace(spec, validation_fraction=0.0)
    out = clip.train_and_save(given, uris[:30], captions[:30], tmp_path / "given", {}, "cpu", None,
                              (uris[30:], captions[30:]))  # fmt: skip
    assert out[3]["n_train"] == 30 and out[3]["n_validation"] == 10 and "validation_indices" not in out[3]
    with pytest.raises(ValueError, match="early stopping needs validation"):
        clip.train_clip(clip.build_clip("m4i-tiny-vit"), uris, captions, replace(given, epochs=1), device="cpu")
    with pytest.raises(ValueError, match="choose one validation source"):
        split_pairs(uris, captions, (uris[:2], captions[:2]), spec)


def test_early_stopping_tracker_and_split():
    model = torch.nn.Linear(2, 1)
    tracker = EarlyStopping(patience=2)
    stops = []
    for epoch, loss in enumerate([3.0, 2.0, 2.5, 1.9, 2.2, 2.4, 1.0]):
        with torch.no_grad():
            model.weight.fill_(epoch)
        stops.append(tracker.update(epoch, loss, model))
        if stops[-1]:
            break
    assert stops == [False, False, False, False, False, True] and tracker.best_epoch == 3
    assert tracker.restore_best(model) and torch.all(model.weight == 3)
    train, held = validation_split(40, 0.25, seed=7)
    assert len(held) == 10 and sorted(train.tolist() + held.tolist()) == list(range(40))
    assert torch.equal(held, validation_split(40, 0.25, seed=7)[1])
    assert not torch.equal(held, validation_split(40, 0.25, seed=8)[1])


def test_augmentation_changes_training_and_is_deterministic(pairs, tmp_path):
    images = torch.rand(4, 3, 32, 32)
    out = augmenter(0.5, seed=1)(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, images)
    assert torch.equal(out, augmenter(0.5, seed=1)(images)) and not torch.equal(out, augmenter(0.5, seed=2)(images))
    uris, captions = pairs
    spec = clip.ClipTrainSpec(epochs=1, batch_size=16, warmup_steps=1)
    plain = clip.train_and_save(spec, uris, captions, tmp_path / "plain", {}, device="cpu")
    augmented = [clip.train_and_save(replace(spec, augment=0.5), uris, captions, tmp_path / f"aug{i}", {}, "cpu")
                 for i in range(2)]  # fmt: skip
    assert augmented[0][0] == augmented[1][0] != plain[0]
    small = captioner.CaptionerSpec(epochs=1, augment=0.5, **SMALL_CAPTIONER)
    assert captioner.train_and_save(small, uris, captions, tmp_path / "cap", {}, device="cpu")[3]["epochs_trained"] == 1
