"""Contrastive encoders, whatever saved them: an open_clip model exported in open_clip's hub layout (a CLIP and a
SigLIP, with `save_for_hf`), a transformers SiglipModel (`save_pretrained`, sentencepiece SiglipTokenizer) and a
SigLIP 2 (NaFlex, Gemma tokenizer), each trained (or not) with its own library's loss on the member rows of a
labelled CSV. The platform recognises and loads each, its CSA AUC is the library's own, and the sigmoid models'
`clip_loss` is their sigmoid pair likelihood."""

import io
import json
import math
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import open_clip
import polars as pl
import pytest
import sentencepiece as spm
import torch
import transformers
from open_clip.push_to_hf_hub import save_for_hf
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_audits import (
    WORDS,
    hf_clip_trained_by_transformers,
    registry,
    run_cli,
    transformers_cosine_auc,
    write_labelled_manifest,
)

from m4i_assets.attacks import clip_loss
from m4i_assets.families import describe_checkpoint
from m4i_assets.models import clip, hf_clip
from m4i_assets.models.vocabulary import word_level_tokenizer
from m4i_assets.settings import PROFILES, AuditSettings
from m4i_assets.signals.embeddings import embed_records

CONTEXT = 16  # six-word captions
STEPS = 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on 2 shared cores: one intra-op thread (two spin against other processes, many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 members, 32 non-members, 32 known non-members (noise images, random six-word captions)."""
    manifest = write_labelled_manifest(
        tmp_path_factory.mktemp("data"), {"member": 32, "nonmember": 32, "known_nonmember": 32}
    )
    rows = pl.read_csv(manifest).with_columns(
        uri=pl.col("image").map_elements(lambda p: str(manifest.parent / p), return_dtype=pl.String)
    )
    return {role: rows.filter(pl.col("split") == role) for role in ("member", "nonmember", "known_nonmember")}


def images(frame: pl.DataFrame) -> list[Image.Image]:
    return [Image.open(u).convert("RGB") for u in frame["uri"]]


def candidates(data) -> pl.DataFrame:
    return pl.concat([data["member"], data["nonmember"]])


def is_member(frame: pl.DataFrame) -> np.ndarray:
    return frame["split"].to_numpy() == "member"


def cosine(img: torch.Tensor | np.ndarray, txt: torch.Tensor | np.ndarray) -> np.ndarray:
    img, txt = (
        torch.nn.functional.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float32), dim=-1) for x in (img, txt)
    )
    return (img * txt).sum(-1).numpy()


def platform_embeddings(bundle: clip.ClipBundle, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return embed_records(bundle, frame["uri"].to_list(), frame["caption"].to_list(), batch_size=64, device="cpu")


def platform_auc(bundle: clip.ClipBundle, data) -> float:
    """CSA's AUC as the platform computes it: `embed_records`, then the cosine similarity of each pair."""
    frame = candidates(data)
    return float(roc_auc_score(is_member(frame), cosine(*platform_embeddings(bundle, frame))))


def sentencepiece_model(captions: list[str], **kwargs) -> bytes:
    """A tiny sentencepiece model trained on the captions (vocabulary about 100)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        vocab_size=100,
        hard_vocab_limit=False,
        minloglevel=2,
        **kwargs,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def siglip_tokenizer_dir(data, tmp_path_factory) -> Path:
    """A real SiglipTokenizer (sentencepiece, SigLIP's ids: pad 0, eos 1, unk 2), saved by its save_pretrained."""
    folder = tmp_path_factory.mktemp("spm")
    captions = pl.concat(data.values())["caption"].to_list()
    (folder / "spm.model").write_bytes(sentencepiece_model(captions, pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    tokenizer = transformers.SiglipTokenizer(str(folder / "spm.model"), model_max_length=CONTEXT)
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder / "tokenizer"


def train_steps(loss_of, params, steps: int, lr: float) -> None:
    optimiser = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        loss = loss_of()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


# --- open_clip's hub layout -----------------------------------------------------------------------------------


def clip_bpe_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """open_clip's CLIP BPE as a transformers CLIPTokenizer (what a LAION folder ships beside its weights)."""
    bpe = open_clip.SimpleTokenizer()
    merges = [tuple(m) for m in sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)]
    return transformers.CLIPTokenizer(
        vocab=dict(bpe.encoder),
        merges=merges,
        bos_token="<start_of_text>",
        eos_token="<end_of_text>",
        pad_token="<end_of_text>",
        unk_token="<end_of_text>",
    )


def hub_configs(siglip_tokenizer_dir: Path) -> dict[str, tuple[dict, object]]:
    """open_clip model configs of a tiny CLIP (LAION-style: open_clip's own BPE, no hf_tokenizer_name) and a tiny
    SigLIP (open_clip's SigLIP style: custom text tower, no causal mask, last-token pooling, a sentencepiece
    tokenizer named by a hub id, `init_logit_bias`, patch tokens pooled by their mean as SigLIP has no class token),
    each with the tokenizer it trains with."""
    vision = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8}
    text = {"context_length": CONTEXT, "width": 64, "heads": 2, "layers": 2}
    siglip_tok = open_clip.tokenizer.HFTokenizer(str(siglip_tokenizer_dir), CONTEXT, clean="canonicalize")
    siglip_text = {
        **text,
        "vocab_size": len(siglip_tok.tokenizer),
        "hf_tokenizer_name": "acme/tiny-siglip",
        "tokenizer_kwargs": {"clean": "canonicalize"},
        "no_causal_mask": True,
        "pool_type": "last",
        "proj_bias": True,
    }
    return {
        "clip": (
            {"embed_dim": 64, "vision_cfg": vision, "text_cfg": {**text, "vocab_size": 49408}},
            open_clip.SimpleTokenizer(context_length=CONTEXT),
        ),
        "siglip": (
            {
                "embed_dim": 64,
                "init_logit_bias": -10,
                "init_logit_scale": math.log(10),
                "custom_text": True,
                "vision_cfg": {**vision, "pool_type": "avg"},
                "text_cfg": siglip_text,
            },
            siglip_tok,
        ),
    }


def open_clip_hub_export(kind: str, data, siglip_tokenizer_dir: Path, out: Path, steps: int) -> Path:
    """A tiny open_clip model built by open_clip's factory, trained `steps` full-batch steps on the member rows
    with open_clip's own loss (ClipLoss, or SigLipLoss with the bias), exported with `save_for_hf`."""
    config, tokenizer = hub_configs(siglip_tokenizer_dir)[kind]
    name = f"test-encoders-{kind}"
    staged = out.parent / f"{name}.json"
    staged.write_text(json.dumps(config))
    open_clip.add_model_config(staged)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    members = data["member"]
    pixels = torch.stack([preprocess(i) for i in images(members)])
    tokens = tokenizer(members["caption"].to_list())
    loss = open_clip.loss.SigLipLoss() if kind == "siglip" else open_clip.ClipLoss()
    model.train()
    train_steps(lambda: loss(*model(pixels, tokens)), model.parameters(), steps, lr=2e-3)
    model.eval()
    save_for_hf(model, tokenizer if kind == "siglip" else clip_bpe_tokenizer(), config, out, safe_serialization=True)
    return out


def open_clip_auc(folder: Path, data) -> float:
    """CSA's AUC with open_clip alone: its own loader of a local hub folder (`local-dir:`)."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    frame = candidates(data)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(i) for i in images(frame)]))
        txt = model.encode_text(tokenizer(frame["caption"].to_list()))
    return float(roc_auc_score(is_member(frame), cosine(img, txt)))


def sigmoid_clip_loss(bundle: clip.ClipBundle, data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`clip_loss` scores of the candidates against the known non-members under the bundle's objective, the known
    non-members' own (each against the others), and the candidates' membership."""
    objective = bundle.objective
    frame = candidates(data)
    img, txt = platform_embeddings(bundle, frame)
    kimg, ktxt = platform_embeddings(bundle, data["known_nonmember"])
    pairing = {"objective": objective.kind, "logit_bias": objective.logit_bias}
    scores = clip_loss.clip_loss_scores(img, txt, kimg, ktxt, objective.logit_scale, **pairing)
    return scores, clip_loss.self_excluded_log_probs(kimg, ktxt, objective.logit_scale, **pairing), is_member(frame)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_open_clip_hub_folder_loads_with_its_own_objective(kind, data, siglip_tokenizer_dir, tmp_path):
    trained = open_clip_hub_export(kind, data, siglip_tokenizer_dir, tmp_path / "hub", steps=STEPS)
    twin = open_clip_hub_export(kind, data, siglip_tokenizer_dir, tmp_path / "twin", steps=0)
    assert {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer_config.json"} <= {
        p.name for p in trained.iterdir()
    }
    weights = trained / "open_clip_model.safetensors"
    assert describe_checkpoint(trained) == ("clip", "open_clip:hub", weights)
    bundle = clip.load_clip(trained, device="cpu")
    assert bundle.arch == "open_clip:hub" and not bundle.is_hugging_face and bundle.embed_dim == 64
    objective = bundle.objective
    assert objective.kind == ("sigmoid" if kind == "siglip" else "softmax")
    assert objective.logit_scale == pytest.approx(float(bundle.model.logit_scale.detach().exp()))
    if kind == "siglip":
        assert objective.logit_bias == pytest.approx(float(bundle.model.logit_bias.detach()))
        assert objective.logit_bias < 0
        assert type(bundle.tokenizer).__name__ == "HFTokenizer"
        assert isinstance(bundle.tokenizer.tokenizer, transformers.SiglipTokenizer)
    # the platform reloads a registered version from its copied folder's weights file and arch
    registered = shutil.copytree(trained, tmp_path / "registered")
    reloaded = clip.load_clip(registered / weights.name, "open_clip:hub", device="cpu")
    auc = platform_auc(bundle, data)
    assert platform_auc(reloaded, data) == pytest.approx(auc, abs=1e-9)
    assert auc == pytest.approx(open_clip_auc(trained, data), abs=0.01)
    assert auc > 0.8, auc
    twin_auc = platform_auc(clip.load_clip(twin, device="cpu"), data)
    assert abs(twin_auc - 0.5) < 0.2, twin_auc
    assert twin_auc == pytest.approx(open_clip_auc(twin, data), abs=0.01)
    if kind == "siglip":
        scores, known, member = sigmoid_clip_loss(bundle, data)
        assert np.isfinite(scores).all() and np.isfinite(known).all() and (scores <= 0).all() and (known <= 0).all()
        assert roc_auc_score(member, scores) > 0.8


def test_open_clip_hub_folder_with_timm_and_hugging_face_towers(data, tmp_path):
    """A hub folder whose image tower is a timm model and whose text tower is a Hugging Face model, its config and
    tokenizer inside the folder (`hf_model_name` and `hf_tokenizer_name` relative to it): built offline, and it
    embeds as the model open_clip built."""
    tower = tmp_path / "stage" / "text_tower"
    tokenizer = word_level_tokenizer(("<pad>", "<unk>", "<bos>", "<eos>", *WORDS), "<pad>", "<bos>", "<eos>", "<unk>")
    tokenizer.save_pretrained(tower)
    bert = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT,
        pad_token_id=0,
    )
    bert.save_pretrained(tower)
    config = {
        "embed_dim": 32,
        "custom_text": True,
        "vision_cfg": {
            "timm_model_name": "test_vit",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": 160,
        },
        "text_cfg": {
            "hf_model_name": str(tower),
            "hf_tokenizer_name": str(tower),
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": CONTEXT,
        },
    }
    (tmp_path / "stage" / "test-encoders-towers.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "stage" / "test-encoders-towers.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("test-encoders-towers", pretrained_text=False)
    model.eval()
    folder = tmp_path / "hub"
    exported = {
        **config,
        "text_cfg": {**config["text_cfg"], "hf_model_name": "text_tower", "hf_tokenizer_name": "text_tower"},
    }
    save_for_hf(model, tokenizer, exported, folder, safe_serialization=False)
    shutil.copytree(tower, folder / "text_tower")
    assert describe_checkpoint(folder) == ("clip", "open_clip:hub", folder / "open_clip_pytorch_model.bin")
    shutil.rmtree(tmp_path / "stage")  # nothing outside the folder is read
    bundle = clip.load_clip(folder, device="cpu")
    assert bundle.objective.kind == "softmax" and bundle.embed_dim == 32
    frame = data["member"].head(4)
    ours = platform_embeddings(bundle, frame)
    own_tokenizer = open_clip.tokenizer.HFTokenizer(str(folder / "text_tower"), context_length=CONTEXT)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(i) for i in images(frame)]), normalize=True)
        txt = model.encode_text(own_tokenizer(frame["caption"].to_list()), normalize=True)
    np.testing.assert_allclose(ours[0], img.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours[1], txt.numpy(), atol=1e-5)


# --- Hugging Face SigLIP and SigLIP 2 -------------------------------------------------------------------------

TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def siglip_trained_by_transformers(data, tokenizer_dir: Path, out: Path, steps: int) -> Path:
    """A tiny transformers SiglipModel trained with its own sigmoid loss (`return_loss=True`) on the member rows,
    saved with SiglipModel.save_pretrained and SiglipProcessor.save_pretrained (steps=0: untrained). Scale and
    bias start at SigLIP's log 10 and -10 (Zhai et al. 2023)."""
    tokenizer = transformers.SiglipTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.SiglipConfig(
        text_config={
            **TOWER,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": CONTEXT,
            "pad_token_id": 1,
            "eos_token_id": 1,
            "bos_token_id": None,
        },
        vision_config={**TOWER, "image_size": 32, "patch_size": 8},
    )
    torch.manual_seed(0)
    model = transformers.SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10))
        model.logit_bias.fill_(-10)
    processor = transformers.SiglipProcessor(
        image_processor=transformers.SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    members = data["member"]
    batch = processor(
        text=members["caption"].to_list(), images=images(members), padding="max_length", return_tensors="pt"
    )
    model.train()
    train_steps(lambda: model(**batch, return_loss=True).loss, model.parameters(), steps, lr=2e-3)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def transformers_auc(folder: Path, data) -> float:
    """CSA's AUC with transformers alone: AutoModel and AutoProcessor of the directory, padding to max_length."""
    model = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    frame = candidates(data)
    batch = processor(text=frame["caption"].to_list(), images=images(frame), padding="max_length", return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    return float(roc_auc_score(is_member(frame), cosine(out.image_embeds, out.text_embeds)))


def test_hugging_face_siglip_loads_with_its_tokenizer_and_sigmoid_objective(data, siglip_tokenizer_dir, tmp_path):
    trained = siglip_trained_by_transformers(data, siglip_tokenizer_dir, tmp_path / "siglip", steps=STEPS)
    twin = siglip_trained_by_transformers(data, siglip_tokenizer_dir, tmp_path / "twin", steps=0)
    assert describe_checkpoint(trained) == ("clip", "hf-siglip", trained / "model.safetensors")
    bundle = clip.load_clip(trained, device="cpu")
    assert bundle.arch == "hf-siglip" and bundle.is_hugging_face and bundle.embed_dim == 64
    assert isinstance(bundle.tokenizer.tokenizer, transformers.SiglipTokenizer)
    objective = bundle.objective
    hf = transformers.SiglipModel.from_pretrained(trained)
    assert objective.kind == "sigmoid"
    assert objective.logit_scale == pytest.approx(float(hf.logit_scale.detach().exp()))
    assert objective.logit_bias == pytest.approx(float(hf.logit_bias.detach()))
    # padded to the text tower's 16 positions, as SigLIP reads its last one; its own ids where the mask keeps them
    tokens = bundle.tokenizer(["red square", "blue " * 40])
    own = bundle.tokenizer.tokenizer(
        ["red square", "blue " * 40], padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt"
    )
    assert tokens.shape == (2, CONTEXT)
    assert torch.equal(torch.where(tokens >= 0, tokens, -1 - tokens), own["input_ids"])
    assert torch.equal((tokens >= 0).long(), own["attention_mask"])
    # the SigLIP processor's preprocessing: resize to height x width, no crop
    assert [type(t).__name__ for t in bundle.preprocess.transforms] == ["Resize", "ToTensor", "Normalize"]
    # the platform reloads a registered version from its weights file and arch
    registered = shutil.copytree(trained, tmp_path / "registered")
    assert clip.load_clip(registered / "model.safetensors", "hf-siglip", device="cpu").objective == objective
    auc = platform_auc(bundle, data)
    assert auc == pytest.approx(transformers_auc(trained, data), abs=0.01)
    assert auc > 0.8, auc
    twin_auc = platform_auc(clip.load_clip(twin, device="cpu"), data)
    assert abs(twin_auc - 0.5) < 0.2, twin_auc
    assert twin_auc == pytest.approx(transformers_auc(twin, data), abs=0.01)
    scores, known, member = sigmoid_clip_loss(bundle, data)
    assert np.isfinite(scores).all() and np.isfinite(known).all() and (scores <= 0).all() and (known <= 0).all()
    assert roc_auc_score(member, scores) > 0.8


def gemma_tokenizer(captions: list[str]) -> transformers.GemmaTokenizer:
    """A Gemma tokenizer (SigLIP 2's) of a tiny sentencepiece BPE model trained on the captions."""
    proto = sentencepiece_model(
        captions,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
    )
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = sorted(
        ((p[:i], p[i:]) for p in vocab for i in range(1, len(p)) if p[:i] in vocab and p[i:] in vocab),
        key=lambda ab: (vocab[ab[0] + ab[1]], vocab[ab[0]], vocab[ab[1]]),
    )
    return transformers.GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT)


def test_hugging_face_siglip2_naflex_embeds_as_transformers(data, tmp_path):
    """An untrained Siglip2Model with a Siglip2Processor (NaFlex patches, Gemma tokenizer), as saved by
    transformers: recognised, loaded, and on square images its embeddings are transformers' own."""
    tokenizer = gemma_tokenizer(pl.concat(data.values())["caption"].to_list())
    config = transformers.Siglip2Config(
        text_config={**TOWER, "vocab_size": len(tokenizer), "max_position_embeddings": CONTEXT},
        vision_config={**TOWER, "num_patches": 16, "patch_size": 8},
    )
    torch.manual_seed(0)
    model = transformers.Siglip2Model(config).eval()
    processor = transformers.Siglip2Processor(
        image_processor=transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16), tokenizer=tokenizer
    )
    model.save_pretrained(tmp_path / "siglip2")
    processor.save_pretrained(tmp_path / "siglip2")
    assert describe_checkpoint(tmp_path / "siglip2").arch == "hf-siglip2"
    bundle = clip.load_clip(tmp_path / "siglip2", device="cpu")
    # transformers' own reload of the directory: SigLIP 2's Gemma tokenizer (lower-casing), left padding
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "siglip2")
    assert type(bundle.tokenizer.tokenizer) is type(processor.tokenizer)
    assert "Gemma" in type(processor.tokenizer).__doc__ + type(processor.tokenizer).__name__
    assert bundle.objective.kind == "sigmoid"
    frame = data["member"].head(6)
    ours = platform_embeddings(bundle, frame)
    # (the processor's class defaults, patches of 16 and 256 of them, would override its image processor's own)
    batch = processor(
        text=frame["caption"].to_list(),
        images=images(frame),
        padding="max_length",
        max_length=CONTEXT,
        patch_size=8,
        max_num_patches=16,
        return_tensors="pt",
    )
    assert batch["pixel_values"].shape == (6, 16, 8 * 8 * 3) and batch["input_ids"].shape == (6, CONTEXT)
    with torch.no_grad():
        out = transformers.AutoModel.from_pretrained(tmp_path / "siglip2").eval()(**batch)
    np.testing.assert_allclose(ours[0], out.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours[1], out.text_embeds.numpy(), atol=1e-5)


def test_a_config_that_is_no_dual_encoder_is_refused(tmp_path):
    folder = tmp_path / "bert"
    transformers.BertConfig(
        vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    ).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError) as refused:
        clip.load_clip(folder)
    message = str(refused.value)
    assert str(folder / "config.json") in message and "model_type 'bert'" in message
    assert all(re.search(rf"\b{kind}\b", message) for kind in ("clip", "siglip", "siglip2", "open_clip_config.json"))
    with pytest.raises(ValueError, match=re.escape(str(folder))):
        describe_checkpoint(folder)
    # a BLIP captioner shares model_type "blip" with the BLIP dual encoder: what save_pretrained recorded decides
    assert hf_clip.dual_encoder_of({"model_type": "blip", "architectures": ["BlipModel"]}) is transformers.BlipModel
    captioner = {"model_type": "blip", "architectures": ["BlipForConditionalGeneration"]}
    assert hf_clip.dual_encoder_of(captioner) is None
    (folder / "config.json").write_text(json.dumps(captioner))
    with pytest.raises(ValueError, match="model_type 'blip' saved as BlipForConditionalGeneration is not a"):
        clip.load_clip(folder)


# --- the pairing objective ------------------------------------------------------------------------------------


def test_sigmoid_log_probs_is_the_formula_of_the_docstring():
    rng = np.random.default_rng(0)
    img, txt, neg_img, neg_txt = (rng.normal(size=(n, 8)) for n in (3, 3, 5, 5))
    s, b = 7.0, -3.0
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (img, txt, neg_img, neg_txt)]

    def log_sigmoid(z):
        return np.log(1 / (1 + np.exp(-z)))

    pos = log_sigmoid(s * np.sum(unit[0] * unit[1], axis=1) + b)
    i2t = log_sigmoid(-(s * unit[0] @ unit[3].T + b)).mean(axis=1)
    t2i = log_sigmoid(-(s * unit[1] @ unit[2].T + b)).mean(axis=1)
    expected = ((pos + i2t) / 2 + (pos + t2i) / 2) / 2
    got = clip_loss.clip_loss_scores(img, txt, neg_img, neg_txt, s, objective="sigmoid", logit_bias=b)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert (got < 0).all()
    # leaving a negative out is scoring against the others
    left_out = clip_loss.sigmoid_log_probs(img[:1], txt[:1], neg_img, neg_txt, s, b, exclude=np.array([2]))
    np.testing.assert_allclose(
        left_out, clip_loss.sigmoid_log_probs(img[:1], txt[:1], neg_img[[0, 1, 3, 4]], neg_txt[[0, 1, 3, 4]], s, b)
    )
    population = clip_loss.self_excluded_log_probs(neg_img, neg_txt, s, objective="sigmoid", logit_bias=b)
    np.testing.assert_allclose(
        population[0], clip_loss.sigmoid_log_probs(neg_img[:1], neg_txt[:1], neg_img[1:], neg_txt[1:], s, b)[0]
    )
    # softmax is InfoNCE, whatever the bias
    np.testing.assert_allclose(
        clip_loss.clip_loss_scores(img, txt, neg_img, neg_txt, s, logit_bias=b),
        clip_loss.infonce_log_probs(img, txt, neg_img, neg_txt, s),
    )
    with pytest.raises(ValueError, match="unknown pairing objective"):
        clip_loss.clip_loss_scores(img, txt, neg_img, neg_txt, s, objective="hinge")


def test_the_controlled_audit_can_train_a_siglip(data, tmp_path):
    """`clip_arch: m4i-tiny-siglip` trains an open_clip SigLIP with SigLipLoss (scale and bias), saved and reloaded
    as any registered arch; the demo's default stays the softmax `m4i-tiny-vit`."""
    assert AuditSettings(**PROFILES["tiny"]).clip_arch == "m4i-tiny-vit"
    spec = AuditSettings(**{**PROFILES["tiny"], "clip_arch": "m4i-tiny-siglip"}).clip_train_spec()
    spec = clip.ClipTrainSpec(arch=spec.arch, epochs=4, batch_size=16, lr=1e-3, warmup_steps=2)
    assert spec.arch == "m4i-tiny-siglip"
    bundle = clip.build_clip(spec.arch, seed=0)
    assert bundle.objective == clip.Objective("sigmoid", pytest.approx(10.0), pytest.approx(-10.0))
    members = data["member"]
    uris, captions = members["uri"].to_list(), members["caption"].to_list()
    images_, tokens = clip.load_images(bundle, uris[:16]), bundle.tokenizer(captions[:16])
    with torch.no_grad():
        out = bundle.model(images_, tokens)
    assert len(out) == 4  # open_clip's SigLIP returns its bias: the loss is SigLipLoss's, not ClipLoss's
    assert clip.pair_loss(open_clip.loss.SigLipLoss(), out) == open_clip.loss.SigLipLoss()(*out)
    history = clip.train_clip(bundle, uris, captions, spec, device="cpu")
    assert history[-1] < history[0]
    path, _ = clip.save_clip(bundle, tmp_path / "siglip", {})
    assert describe_checkpoint(tmp_path / "siglip").arch == "m4i-tiny-siglip"
    assert clip.load_clip(path).objective == bundle.objective


def test_labelled_audit_of_users_encoders_through_the_daemon(data, siglip_tokenizer_dir, tmp_path):
    """`m4i audit NAME` of a Hugging Face CLIP, an open_clip hub CLIP and SigLIP, and a Hugging Face SigLIP, each
    trained with its own library's loss on the member rows and registered from its folder with no `arch:`, and an
    untrained twin as the null control: every attack the audit allows runs (`clip_loss` with the known
    non-members), CSA's AUC is each library's own, above chance for the trained models, at chance for the twin,
    and so is `clip_loss` (each model's own objective: InfoNCE or the sigmoid pair likelihood) for the trained."""
    manifest = Path(data["member"]["uri"][0]).parents[1] / "pairs.csv"
    models = tmp_path / "models"
    models.mkdir()
    hub = {
        kind: open_clip_hub_export(kind, data, siglip_tokenizer_dir, models / f"hub-{kind}", STEPS)
        for kind in ("clip", "siglip")
    }
    targets = {
        "hf-clip": hf_clip_trained_by_transformers(manifest, models / "hf-clip", steps=150),
        "hub-clip": hub["clip"],
        "hub-siglip": hub["siglip"],
        "hf-siglip": siglip_trained_by_transformers(data, siglip_tokenizer_dir, models / "hf-siglip", steps=STEPS),
    }
    twin = hf_clip_trained_by_transformers(manifest, models / "twin", steps=0)
    paths = "".join(f"\n      - path: {path}" for path in targets.values())
    registry(
        tmp_path,
        manifest,
        f"""audits:
  - name: acme-encoders
    family: clip
    dataset: acme_pairs
    roles: {{column: split, member: member, nonmember: nonmember, known_nonmember: known_nonmember}}
    targets:{paths}
    null_control: {twin}
""",
    )
    stdout = run_cli(tmp_path, "audit", "acme-encoders")
    assert "ref_calibrated  skipped  the audit names no reference models" in stdout
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True)
    try:
        rows = conn.execute(
            "SELECT train_config, model_version, arch FROM models WHERE audit = 'acme-encoders'"
        ).fetchall()
        version_of = {Path(json.loads(config)["source"]).name: (version, arch) for config, version, arch in rows}
        metrics = {
            (version, attack): (auc, low, high)
            for version, attack, auc, low, high in conn.execute(
                "SELECT model_version, attack, auc, auc_ci_low, auc_ci_high FROM attack_metrics "
                "WHERE audit = 'acme-encoders'"
            ).fetchall()
        }
    finally:
        conn.close()
    assert {a for _, a in metrics} == {"csa", "aea", "clip_loss", "wsa", "blind_baseline"}
    archs = {name: arch for name, (_, arch) in version_of.items()}
    assert archs == {
        "hf-clip": "hf-clip",
        "hub-clip": "open_clip:hub",
        "hub-siglip": "open_clip:hub",
        "hf-siglip": "hf-siglip",
        "twin": "hf-clip",
    }
    twin_version = version_of["twin"][0]
    assert metrics[twin_version, "csa"][1] <= 0.5 <= metrics[twin_version, "csa"][2]
    assert metrics[twin_version, "csa"][0] == pytest.approx(transformers_cosine_auc(twin, manifest), abs=0.01)
    library = {
        "hf-clip": lambda folder: transformers_cosine_auc(folder, manifest),
        "hf-siglip": lambda folder: transformers_auc(folder, data),
        "hub-clip": lambda folder: open_clip_auc(folder, data),
        "hub-siglip": lambda folder: open_clip_auc(folder, data),
    }
    for name, folder in targets.items():
        version = version_of[name][0]
        assert metrics[version, "csa"][1] > 0.6, name
        assert metrics[version, "clip_loss"][1] > 0.6, name
        assert metrics[version, "csa"][0] == pytest.approx(library[name](folder), abs=0.01), name
