"""Hugging Face captioners whatever saved them: a tiny BLIP and a tiny GIT trained with their library's own loss on
the member rows of a manifest and saved with `save_pretrained` load as captioners, generate as their `generate`
does, score each caption by the library's own loss, and give shadows of their own architecture."""

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import transformers
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_audits import WORDS, write_labelled_manifest

from m4i_assets.data.text import normalise_caption
from m4i_assets.families import describe_checkpoint
from m4i_assets.models.captioner import (
    CaptionerSpec,
    caption_nll,
    caption_token_logprobs,
    generate_captions,
    load_captioner,
    train_and_save,
)

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
SMALL = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 2}
VISION = {**SMALL, "image_size": 32, "patch_size": 8}


def bert_tokenizer(folder: Path, bos: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """A BERT WordPiece tokenizer over the manifest's words ([CLS] ... [SEP]), as BLIP and GIT use."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join((*SPECIALS, *WORDS)) + "\n")
    return transformers.BertTokenizerFast(str(folder / "vocab.txt"), **({"bos_token": bos} if bos else {}))


def blip(folder: Path) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    tokenizer = bert_tokenizer(folder / "vocab", bos="[DEC]")
    text = {
        **SMALL,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 32,
        "pad_token_id": 0,
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    model = transformers.BlipForConditionalGeneration(transformers.BlipConfig(text_config=text, vision_config=VISION))
    image_processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    return model, transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def git(folder: Path) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    tokenizer = bert_tokenizer(folder / "vocab")
    config = transformers.GitConfig(
        vision_config=VISION,
        vocab_size=len(tokenizer),
        max_position_embeddings=32,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SMALL,
    )
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformers.GitForCausalLM(config), transformers.GitProcessor(image_processor, tokenizer)


BUILDERS = {"blip": blip, "git": git}


def library_inputs(kind: str, model, processor, images: list, captions: list[str]) -> dict:
    """The processor's inputs with labels (padding -100), BLIP's first token its decoder's bos as in its generate."""
    inputs = processor(images=images, text=captions, padding=True, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    if kind == "blip":
        inputs["input_ids"][:, 0] = model.config.text_config.bos_token_id
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return dict(inputs)


def trained_by_transformers(kind: str, manifest: Path, out: Path, steps: int) -> Path:
    """A tiny model of `kind` trained full-batch with its library's own loss on the member rows, saved with
    save_pretrained of model and processor (steps=0: untrained)."""
    torch.manual_seed(0)
    model, processor = BUILDERS[kind](out.parent / f"{out.name}-tokenizer")
    members = pl.read_csv(manifest).filter(pl.col("split") == "member")
    images = [Image.open(manifest.parent / p).convert("RGB") for p in members["image"]]
    inputs = library_inputs(kind, model, processor, images, members["caption"].to_list())
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**inputs).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def library_losses(kind: str, folder: Path, uris: list[str], captions: list[str]) -> np.ndarray:
    """Each record's own loss, computed with transformers alone (AutoModelForImageTextToText, AutoProcessor)."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        return np.array(
            [
                float(model(**library_inputs(kind, model, processor, [Image.open(u).convert("RGB")], [c])).loss)
                for u, c in zip(uris, captions)
            ]
        )


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """(manifest, image uris, captions, is_member) of 32 members and 32 non-members."""
    manifest = write_labelled_manifest(tmp_path_factory.mktemp("data"), {"member": 32, "nonmember": 32})
    rows = pl.read_csv(manifest)
    uris = [str(manifest.parent / p) for p in rows["image"]]
    return manifest, uris, rows["caption"].to_list(), rows["split"].to_numpy() == "member"


@pytest.fixture(scope="module", params=list(BUILDERS))
def target(request, records, tmp_path_factory):
    """(kind, trained folder, untrained twin folder) of one model type."""
    root = tmp_path_factory.mktemp(request.param)
    trained = trained_by_transformers(request.param, records[0], root / "trained", steps=60)
    return request.param, trained, trained_by_transformers(request.param, records[0], root / "untrained", steps=0)


def test_hugging_face_captioners_load_generate_and_score_as_their_library(records, target):
    """Recognised and loaded as captioners; greedy captions, sampled ones, per-record NLL and the membership AUC
    as transformers alone gives them."""
    _, uris, captions, is_member = records
    kind, trained, untrained = target
    assert describe_checkpoint(trained) == ("captioner", f"hf-{kind}", trained / "model.safetensors")
    bundle = load_captioner(trained)
    assert bundle.vocab is None and bundle.spec.arch == f"hf-{kind}"
    # greedy captions as the model's own generate and its tokenizer's decoding give them
    model = transformers.AutoModelForImageTextToText.from_pretrained(trained).eval()
    processor = transformers.AutoProcessor.from_pretrained(trained)
    pixels = processor(images=[Image.open(u).convert("RGB") for u in uris[:8]], return_tensors="pt")["pixel_values"]
    ids = model.generate(pixel_values=pixels, max_length=bundle.spec.max_len + 2, do_sample=False, num_beams=1)
    generated = generate_captions(bundle, uris[:8], device="cpu")
    assert generated == [normalise_caption(t) for t in processor.batch_decode(ids, skip_special_tokens=True)]
    assert sum(g == normalise_caption(c) for g, c in zip(generated, captions[:8])) >= 4  # members: memorised
    hot = generate_captions(bundle, uris[:8], device="cpu", temperature=1.5, seed=5)
    assert hot == generate_captions(bundle, uris[:8], device="cpu", temperature=1.5, seed=5) != generated
    # the caption NLL is the library's own loss, record by record; so is the membership AUC
    nll = caption_nll(bundle, uris, captions, batch_size=16, device="cpu")
    np.testing.assert_allclose(nll, library_losses(kind, trained, uris, captions), atol=1e-4, rtol=0)
    logprobs = caption_token_logprobs(bundle, uris, captions, device="cpu")
    assert [len(p) for p in logprobs] == [len(c.split()) + 1 for c in captions]  # six words and [SEP]
    np.testing.assert_allclose([-p.mean() for p in logprobs], nll, atol=1e-6, rtol=0)
    auc = roc_auc_score(is_member, -nll)
    assert auc > 0.9 and abs(auc - roc_auc_score(is_member, -library_losses(kind, trained, uris, captions))) < 0.01
    twin = caption_nll(load_captioner(untrained), uris, captions, device="cpu")
    assert abs(roc_auc_score(is_member, -twin) - 0.5) < 0.2


def test_shadow_of_a_targets_architecture_trains_saves_and_reloads(records, target, tmp_path):
    """`hf-<model_type>` with the target's directory: its config at random init, its tokenizer and processor,
    trained by the platform's loop on the tokenizer's ids and saved as a Hugging Face directory."""
    _, uris, captions, _ = records
    kind, trained, _ = target
    spec = CaptionerSpec(
        arch=f"hf-{kind}", extra={"config_dir": str(trained)}, epochs=6, batch_size=16, lr=3e-3, max_len=10
    )
    sha, history, n_params, _ = train_and_save(
        spec, uris[32:], captions[32:], tmp_path / "shadow", {"role": "s"}, device="cpu"
    )
    target_parameters = transformers.AutoModelForImageTextToText.from_pretrained(trained).num_parameters()
    assert history[-1] < history[0] and n_params == target_parameters
    assert describe_checkpoint(tmp_path / "shadow")[:2] == ("captioner", f"hf-{kind}")
    assert json.loads((tmp_path / "shadow" / "m4i.json").read_text())["spec"]["extra"] == spec.extra
    shadow = load_captioner(tmp_path / "shadow")
    assert shadow.spec == spec and shadow.vocab is None
    # its own training pairs (the non-members) are likelier than the others
    nll = caption_nll(shadow, uris, captions, device="cpu")
    assert nll[32:].mean() < nll[:32].mean()
    assert all(isinstance(c, str) for c in generate_captions(shadow, uris[:4], device="cpu"))
    assert train_and_save(spec, uris[32:], captions[32:], tmp_path / "again", {"role": "s"}, device="cpu")[0] == sha
    with pytest.raises(ValueError, match="holds a"):
        train_and_save(
            CaptionerSpec(arch="hf-git" if kind == "blip" else "hf-blip", extra=spec.extra, epochs=1),
            uris[:4],
            captions[:4],
            tmp_path / "wrong",
            {},
            device="cpu",
        )


def test_directories_of_no_captioner_are_refused(target, tmp_path):
    """Another model type, or the captioner's model type saved as another class, or a directory without its
    tokenizer or processor: errors naming the file, the model_type found and what loads."""
    kind, trained, _ = target
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    (bert / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"model_type 'bert' is not a captioner; supported: .*image-to-text"):
        load_captioner(bert)
    with pytest.raises(ValueError, match="config.json"):
        describe_checkpoint(bert)
    with pytest.raises(ValueError, match="model_type 'bert'"):
        train_and_save(CaptionerSpec(arch="hf-bert", extra={"config_dir": str(bert)}), [], [], tmp_path / "x", {})
    (bert / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither a model_type nor family"):
        load_captioner(bert)
    # the model type's other classes: BLIP's and GIT's bare models (BlipModel is a contrastive dual encoder)
    bare = tmp_path / "bare"
    shutil.copytree(trained, bare)
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "architectures": [f"{kind.capitalize()}Model"]}))
    with pytest.raises(ValueError, match=rf"model_type '{kind}' \(architectures \['{kind.capitalize()}Model'\]\)"):
        load_captioner(bare)
    for missing in ("tokenizer_config.json", "processor_config.json"):
        incomplete = tmp_path / missing
        shutil.copytree(trained, incomplete)
        (incomplete / missing).unlink()
        with pytest.raises(FileNotFoundError, match=missing):
            load_captioner(incomplete)
