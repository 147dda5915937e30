"""CLIP checkpoints from local paths, in each format the project saves itself: an open_clip architecture with
a `.safetensors` or torch (`.pt`, `.bin`) weights file, and a Hugging Face CLIPModel directory. Each round-trips,
its model version is its weights file's content hash, and a bad file is a clear error naming it."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from dagster import DagsterInstance, build_sensor_context
from PIL import Image
from safetensors.torch import load_file, save_file

from m4i_assets.defs.automation import describe_checkpoint, watched_models_sensor
from m4i_assets.defs.definitions import build_definitions
from m4i_assets.defs.resources import Storage
from m4i_assets.models import clip, hf_clip
from m4i_assets.models.captioner import CaptionerSpec, Vocabulary, build_captioner, save_captioner
from m4i_assets.models.checkpoints import checkpoint_tensor_count, model_version_for, read_state_dict, sha256_file
from m4i_assets.models.clip import split_normalisation
from m4i_assets.settings import settings_for
from m4i_assets.signals.augmentations import augmented_image_embeddings, transform_registry
from m4i_assets.signals.embeddings import embed_records

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
HF_SPEC = clip.ClipTrainSpec(arch="hf-clip-tiny", epochs=8, batch_size=8, lr=2e-3, warmup_steps=1)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Eight 32 px PNG images (a coloured square on noise) and their captions."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    uris, captions = [], []
    for i, colour in enumerate(COLOURS):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        pixels[8 + i % 4 : 20 + i % 4, 6 + i : 18 + i] = rng.integers(0, 256, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        uris.append(str(root / f"{i}.png"))
        captions.append(f"A {colour} square, number {i}, on grey noise.")
    return uris, captions


@pytest.fixture(scope="module")
def open_clip_bundle():
    return clip.build_clip("m4i-tiny-vit", seed=0)


@pytest.fixture(scope="module")
def hf_saved(records, tmp_path_factory):
    """An hf-clip-tiny trained by `train_clip` and saved by `save_clip`: (bundle, loss history, folder, sha)."""
    uris, captions = records
    bundle = clip.build_clip("hf-clip-tiny", seed=0, captions=captions)
    history = clip.train_clip(bundle, uris, captions, HF_SPEC, device="cpu")
    folder = tmp_path_factory.mktemp("hf") / "m"
    path, sha = clip.save_clip(bundle, folder, {"role": "test"})
    assert path == folder / "model.safetensors"
    return bundle, history, folder, sha


_reference: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def embeddings(bundle, records):
    uris, captions = records
    return embed_records(bundle, uris, captions, batch_size=5, device="cpu")


def assert_same_embeddings(reference, loaded, records):
    """`loaded` embeds the records as the `reference` bundle does (its embeddings computed once)."""
    if id(reference) not in _reference:
        _reference[id(reference)] = embeddings(reference, records)
    for x, y in zip(_reference[id(reference)], embeddings(loaded, records)):
        np.testing.assert_allclose(x, y, atol=1e-5)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- open_clip architecture + weights file -------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["model.safetensors", "model.pt", "epoch_3.bin"])
def test_open_clip_weights_files_round_trip(open_clip_bundle, records, tmp_path, weights):
    path, sha = clip.save_clip(open_clip_bundle, tmp_path / "m", {"role": "test"}, weights=weights)
    assert path == tmp_path / "m" / weights and sha == sha256_file(path)
    assert checkpoint_tensor_count(path) == len(open_clip_bundle.model.state_dict())
    by_sidecar = clip.load_clip(path, device="cpu")  # the arch from the model.json beside the file
    by_arch = clip.load_clip(path, "m4i-tiny-vit", device="cpu")
    assert by_sidecar.arch == by_arch.arch == "m4i-tiny-vit" and by_arch.embed_dim == 128
    assert_same_embeddings(open_clip_bundle, by_sidecar, records)
    for (key, value), loaded in zip(open_clip_bundle.model.state_dict().items(), by_arch.model.state_dict().values()):
        assert torch.equal(value, loaded), key
    # same bytes, same version: a copy elsewhere and a second save of the same weights
    shutil.copy(path, tmp_path / weights)
    assert model_version_for("clip", sha256_file(tmp_path / weights)) == model_version_for("clip", sha)
    assert clip.save_clip(open_clip_bundle, tmp_path / "again", {"role": "other"}, weights=weights)[1] == sha


def test_open_clip_training_layouts_load(open_clip_bundle, records, tmp_path):
    """open_clip's training writes {"epoch", "name", "state_dict", "optimizer"}, keys prefixed "module." under
    DistributedDataParallel; a bare state dict is accepted too."""
    state = open_clip_bundle.model.state_dict()
    ddp = tmp_path / "epoch_5.pt"
    torch.save({"epoch": 5, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}}, ddp)  # fmt: skip
    bare = tmp_path / "bare.bin"
    torch.save(dict(state), bare)
    for path in (ddp, bare):
        assert_same_embeddings(open_clip_bundle, clip.load_clip(path, "m4i-tiny-vit", device="cpu"), records)
    assert sha256_file(ddp) != sha256_file(bare)  # different bytes, different versions


class Trap:
    """Unpickling this would create a file: a weights-only load must refuse it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_bad_open_clip_checkpoints_are_clear_errors(open_clip_bundle, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    with pytest.raises(FileNotFoundError, match=re.escape(f"not found: {path}")):
        clip.load_clip(path, "m4i-tiny-vit")
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{path} is empty")):
        clip.load_clip(path, "m4i-tiny-vit")
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable")):
        clip.load_clip(path, "m4i-tiny-vit")
    path.unlink()
    clip.save_clip(open_clip_bundle, tmp_path, {}, weights=path.name)
    truncate(path)
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable")):
        clip.load_clip(path, "m4i-tiny-vit")
    # a state dict of another architecture: the file, the arch and the first mismatched key are named
    clip.save_clip(clip.build_clip("m4i-tiny-rn"), tmp_path, {}, weights=path.name)
    with pytest.raises(
        ValueError, match=re.escape(f"{path} does not match architecture 'm4i-tiny-vit': missing key 'visual")
    ):
        clip.load_clip(path, "m4i-tiny-vit")
    (tmp_path / "model.json").unlink()
    with pytest.raises(ValueError, match=re.escape(f"{path}: no architecture given")):
        clip.load_clip(path)
    with pytest.raises(ValueError, match="'hf-clip-tiny' is not an open_clip architecture"):
        clip.load_clip(path, "hf-clip-tiny")


def test_torch_files_are_read_weights_only(tmp_path):
    sentinel = tmp_path / "created-by-unpickling"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "trap": Trap(sentinel)}, path)
    with pytest.raises(
        ValueError, match=re.escape(f"{path} is not a readable weights-only torch checkpoint: it pickles")
    ):
        read_state_dict(path)
    assert not sentinel.exists()
    torch.save({"epoch": 1}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path} holds no state dict")):
        read_state_dict(path)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="model.onnx: not a weights file"):
        read_state_dict(tmp_path / "model.onnx")


# --- Hugging Face CLIPModel directory ------------------------------------------------------------------------


def test_hf_clip_trains_saves_and_round_trips(hf_saved, records, tmp_path):
    bundle, history, folder, sha = hf_saved
    assert history[-1] < history[0] and bundle.embed_dim == clip.embed_dim("hf-clip-tiny") == 64
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "m4i.json"} <= {p.name for p in folder.iterdir()}  # fmt: skip
    assert sha == sha256_file(folder / "model.safetensors")
    for loaded in (clip.load_clip(folder), clip.load_clip(folder / "model.safetensors", "hf-clip-tiny")):
        assert loaded.arch == "hf-clip-tiny" and loaded.is_hugging_face
        assert_same_embeddings(bundle, loaded, records)
    # a user's directory: no m4i.json, weights as pytorch_model.bin
    user = tmp_path / "user"
    shutil.copytree(folder, user, ignore=shutil.ignore_patterns("m4i.json", "model.safetensors"))
    torch.save(load_file(folder / "model.safetensors"), user / "pytorch_model.bin")
    loaded = clip.load_clip(user)
    assert loaded.arch == "hf-clip"
    assert_same_embeddings(bundle, loaded, records)
    # the tokenizer pads to the context length and keeps the eos of a caption cut short
    tokens = loaded.tokenizer(["a red square " * 40, "a red square"])
    assert tokens.shape == (2, 64) and tokens.dtype == torch.long
    assert tokens[0, -1] == tokens[1, 4] == hf_clip.EOS and tokens[1, 5:].eq(hf_clip.PAD).all()


def test_hf_clip_directory_is_a_plain_hugging_face_directory(hf_saved, records):
    bundle, _, folder, _ = hf_saved
    uris, captions = records
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    images = [Image.open(u).convert("RGB") for u in uris]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    # the Compose preprocessing is the image processor's at the model's resolution
    torch.testing.assert_close(torch.stack([bundle.preprocess(i) for i in images]), pixels, atol=1e-5, rtol=0)
    ids = tokenizer(captions, padding="max_length", max_length=64, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = torch.nn.functional.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    ours = embeddings(bundle, records)
    np.testing.assert_allclose(img.numpy(), ours[0], atol=1e-5)
    np.testing.assert_allclose(txt.numpy(), ours[1], atol=1e-5)


def test_hf_clip_training_gives_the_same_bytes(records, tmp_path):
    uris, captions = records
    spec = clip.ClipTrainSpec(arch="hf-clip-tiny", epochs=1, batch_size=8, warmup_steps=1)
    first = clip.train_and_save(spec, uris, captions, tmp_path / "a", {"role": "a"}, device="cpu")
    second = clip.train_and_save(spec, uris, captions, tmp_path / "b", {"role": "b"}, device="cpu")
    assert first[0] == second[0] == sha256_file(tmp_path / "a" / "model.safetensors")
    assert model_version_for("clip", first[0]) == f"clip-{first[0][:12]}"
    with pytest.raises(ValueError, match="pass captions"):
        clip.build_clip("hf-clip-tiny")


def test_bad_hugging_face_directories_are_clear_errors(hf_saved, records, tmp_path):
    folder = hf_saved[2]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{weights} is empty")):
        clip.load_clip(bad)
    weights.write_bytes(np.random.default_rng(2).bytes(4096))
    with pytest.raises(ValueError, match=re.escape(f"{weights} is not a readable safetensors")):
        clip.load_clip(bad)
    shutil.copy(folder / "model.safetensors", weights)
    truncate(weights)
    with pytest.raises(ValueError, match=re.escape(f"{weights} is not a readable safetensors")):
        clip.load_clip(bad)
    # another model's weights: an open_clip CLIP, or an hf-clip-tiny of another vocabulary
    save_file(clip.build_clip("m4i-tiny-vit").model.state_dict(), str(weights))
    with pytest.raises(
        ValueError, match=re.escape(f"{weights} does not match the CLIPModel of {bad / 'config.json'}: missing")
    ):
        clip.load_clip(bad)
    other = clip.build_clip("hf-clip-tiny", captions=["one two three"])
    save_file(other.model.hf.state_dict(), str(weights))
    with pytest.raises(ValueError, match="key 'text_model.embeddings.token_embedding.weight' has shape"):
        clip.load_clip(weights, "hf-clip-tiny")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{weights} not found")):
        clip.load_clip(bad)
    shutil.copy(folder / "model.safetensors", weights)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "config.json"):
        (bad / name).unlink()
        with pytest.raises(FileNotFoundError, match=re.escape(f"{bad / name} not found")):
            clip.load_clip(bad)
        shutil.copy(folder / name, bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="is not a CLIP config"):
        clip.load_clip(bad)
    assert clip.load_clip(folder).arch == "hf-clip-tiny"  # the original is untouched


def test_signal_path_runs_on_a_hugging_face_clip(hf_saved, records):
    uris, captions = records
    bundle = clip.load_clip(hf_saved[2], device="cpu")
    img, txt = embed_records(bundle, uris, captions, batch_size=3)
    assert img.shape == txt.shape == (len(uris), bundle.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    to_tensor, normalise = split_normalisation(bundle.preprocess)
    assert to_tensor(Image.open(uris[0]).convert("RGB")).shape == (3, 32, 32)
    augmented = augmented_image_embeddings(bundle, uris, transform_registry(0), batch_size=5)
    assert set(augmented) == set(transform_registry(0))
    for emb in augmented.values():
        assert emb.shape == img.shape and np.isfinite(emb).all()
    assert not np.allclose(augmented["horizontal_flip"], img, atol=1e-4)


# --- watched-folder layouts ----------------------------------------------------------------------------------


def test_describe_checkpoint_knows_each_layout(open_clip_bundle, hf_saved, records, tmp_path):
    clip.save_clip(open_clip_bundle, tmp_path / "st", {})
    assert describe_checkpoint(tmp_path / "st") == ("clip", "m4i-tiny-vit", tmp_path / "st" / "model.safetensors")
    clip.save_clip(open_clip_bundle, tmp_path / "pt", {}, weights="epoch_2.pt")
    assert describe_checkpoint(tmp_path / "pt") == ("clip", "m4i-tiny-vit", tmp_path / "pt" / "epoch_2.pt")
    folder = hf_saved[2]
    assert describe_checkpoint(folder) == ("clip", "hf-clip-tiny", folder / "model.safetensors")
    shutil.copytree(folder, tmp_path / "user", ignore=shutil.ignore_patterns("m4i.json"))
    assert describe_checkpoint(tmp_path / "user") == ("clip", "hf-clip", tmp_path / "user" / "model.safetensors")
    (tmp_path / "user" / "model.safetensors").rename(tmp_path / "user" / "pytorch_model.bin")
    assert describe_checkpoint(tmp_path / "user").weights == tmp_path / "user" / "pytorch_model.bin"
    (tmp_path / "user" / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        describe_checkpoint(tmp_path / "user")
    spec = CaptionerSpec(feature_dim=8, embed_dim=8, hidden_dim=8)
    save_captioner(build_captioner(Vocabulary.build(records[1]), spec), tmp_path / "cap", {})
    assert describe_checkpoint(tmp_path / "cap") == ("captioner", "cnn-lstm", tmp_path / "cap" / "model.safetensors")


def test_sensor_registers_torch_and_hugging_face_checkpoints(open_clip_bundle, hf_saved, records, tmp_path):
    storage, settings = Storage(home=str(tmp_path)), settings_for("tiny")
    watched = tmp_path / "watched_models"
    _, pt_sha = clip.save_clip(open_clip_bundle, watched / "from_open_clip", {}, weights="epoch_9.pt")
    shutil.copytree(hf_saved[2], watched / "from_hf", ignore=shutil.ignore_patterns("m4i.json"))
    (watched / "copying").mkdir()
    (watched / "copying" / "model.json").write_text(json.dumps({"family": "clip", "arch": "m4i-tiny-vit"}))

    repository = build_definitions(home=tmp_path, settings=settings).get_repository_def()

    def tick(cursor=None):
        context = build_sensor_context(instance=DagsterInstance.ephemeral(), cursor=cursor, repository_def=repository,
                                       resources={"storage": storage, "settings": settings})  # fmt: skip
        return watched_models_sensor(context)

    first = tick()
    versions = [r.tags["m4i/version"] for r in first.run_requests]
    assert versions == [f"clip-{hf_saved[3][:12]}@tiny", f"clip-{pt_sha[:12]}@tiny"]  # folders in name order
    assert json.loads(first.cursor)["copying"] == [f"{watched / 'copying'}: no weights file "
                                                   "(model.safetensors, *.pt, *.pth or *.bin)"]  # fmt: skip
    for version, weights in zip(versions, ("model.safetensors", "epoch_9.pt")):
        row = storage.repository.model_info(version)
        assert row["checkpoint_uri"] == str(storage.models_dir / version / weights)
        assert row["sha256"] == sha256_file(row["checkpoint_uri"])
        # what the signal assets do with the row
        assert_same_embeddings(
            open_clip_bundle if weights.endswith(".pt") else hf_saved[0],
            clip.load_clip(row["checkpoint_uri"], row["arch"], device="cpu"),
            records,
        )
    assert storage.repository.model_info(versions[0])["arch"] == "hf-clip"
    assert tick(first.cursor).run_requests == []  # unchanged folders launch nothing


def test_hf_clip_saved_with_clip_processor_loads(hf_saved, records, tmp_path):
    """transformers 5 saves a CLIPProcessor as `processor_config.json` (no preprocessor_config.json): such a
    directory, written by CLIPModel.save_pretrained and CLIPProcessor.save_pretrained, loads and embeds."""
    bundle, _, folder, _ = hf_saved
    model = transformers.CLIPModel.from_pretrained(folder)
    processor = transformers.CLIPProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(folder),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
    )
    user = tmp_path / "user-clip"
    model.save_pretrained(user)
    processor.save_pretrained(user)
    assert (user / "processor_config.json").is_file() and not (user / "preprocessor_config.json").exists()
    loaded = clip.load_clip(user, device="cpu")
    assert loaded.arch == "hf-clip"
    np.testing.assert_allclose(embeddings(loaded, records)[0], embeddings(bundle, records)[0], atol=1e-5)
    assert describe_checkpoint(user).family == "clip"
    (user / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json not found \\(nor processor_config.json\\)"):
        clip.load_clip(user)
