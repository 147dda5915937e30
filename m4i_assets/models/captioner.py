"""Image captioner adapter: two target architectures, each trainable on a CPU in minutes, and any Hugging Face
image-to-text captioner.

`cnn-lstm` is the M^4I paper's captioner (Hu et al., NeurIPS 2022, M^4I, section 4.1): an image encoder
mapped linearly to 256 dimensions and a one-layer LSTM decoder (embedding 256, hidden 512) with greedy
decoding. The paper's encoder is an ImageNet ResNet-152 / VGG-16; no pretrained weights can be fetched
here, so the encoder is a small CNN trained from scratch with the decoder. The paper caps captions at 20
tokens; the embedded corpus's captions are longer, so `max_len` is a config value.

`vit-gpt2` is ours, a second architecture for the architecture-restricted scenario: a small `transformers`
VisionEncoderDecoderModel (ViT encoder, GPT-2 decoder with cross-attention) built from configs, with the
vocabulary as a `tokenizers` WordLevel tokenizer and a ViTImageProcessor that also prepares the training
pixels. It is saved as a standard Hugging Face directory.

`load_captioner` loads this module's folders and any Hugging Face image-to-text directory, whatever saved it: a
VisionEncoderDecoder, BLIP (BlipForConditionalGeneration + BlipProcessor), GIT (GitForCausalLM + GitProcessor)
or another model type that AutoModelForImageTextToText loads, with its tokenizer and image processor
(`models.hf_captioner`). Such a directory generates by its own `generate` and is teacher-forced on its own
tokenizer's ids, as its own loss reads them, so that `caption_nll` is the model's own loss on each caption. An
arch `hf-<model_type>` with `extra["config_dir"]` (a directory of that model type, e.g. an audited target) is a
randomly initialised model of that directory's config with its tokenizer and image processor, trained by the
same loop: a shadow captioner of the target's own architecture (M^4I's unrestricted scenario).

The vocabulary is built offline from the training captions (word level, after the same normalisation the
caption metrics use); a Hugging Face directory not built here brings its own tokenizer. All architectures share
one teacher-forced training loop and greedy decoding. The sha256 of `model.safetensors` (written without varying
metadata) names the model version, as for CLIPs; the bytes are reproducible for the same spec, data and torch
thread count.

Training-time defenses (`spec.defense`, `models.training`, `models.dp`) run in the same loop: DP-SGD with Opacus for
cnn-lstm (built with group norm instead of batch norm, `CaptionerSpec.norm`; its LSTM trained as
`models.dp.SequenceLSTM` and saved under nn.LSTM's names; the loss averaged per caption, so that each
caption's gradient depends on that caption alone), training-time augmentation, weight decay and early
stopping on validation pairs. A defended checkpoint is an ordinary checkpoint of its arch.

Speed (500 images of 32 px, 30 epochs, batch 64, max_len 48, one CPU thread): vit-gpt2 at its default
sizes (width 128, 2 + 2 layers, patch 8; 1.0M parameters) about 53 s, cnn-lstm at the paper's sizes
(2.1M parameters) about 100 s.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from m4i_assets.data.images import load_image_tensor, open_rgb
from m4i_assets.data.text import normalise_caption
from m4i_assets.models.checkpoints import HF_ARCH_PREFIX, M4I_FILE, read_json_object, sha256_file
from m4i_assets.models.device import device_for
from m4i_assets.models.hf_captioner import (
    IGNORE,
    SUPPORTED,
    caption_tokens,
    check_captioner_config,
    image_size,
    load_model,
    teacher_forced_logits,
    text_positions,
    untrained_twin,
)
from m4i_assets.models.hf_files import tokenizer_and_image_processor
from m4i_assets.models.training import (
    FamilyTraining,
    TrainingDefense,
    augmenter,
    batch_inputs,
    fit_pairs,
    split_pairs,
    training_facts,
)
from m4i_assets.models.training import (
    train_and_save as train_family_and_save,
)
from m4i_assets.models.vocabulary import caption_words, tokenize, word_level_tokenizer

FAMILY = "captioner"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
SAMPLED_DECODING_TOP_K = 10
"""Top-k of the `sampled_decoding` defense: its strength is the temperature, k stays fixed."""


@dataclass(frozen=True)
class Vocabulary:
    words: tuple[str, ...]  # index -> word, the specials first

    @classmethod
    def build(cls, captions: list[str], min_count: int = 1) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        return cls(words=SPECIALS + caption_words(captions, min_count))

    def encode(self, caption: str, max_len: int) -> list[int]:
        """BOS, word ids, EOS, padded or cut to `max_len + 2` ids."""
        index = {w: i for i, w in enumerate(self.words)}
        ids = [BOS] + [index.get(w, UNK) for w in tokenize(caption)][:max_len] + [EOS]
        return ids + [PAD] * (max_len + 2 - len(ids))

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.words[i])
        return " ".join(out)

    def tokenizer(self) -> transformers.PreTrainedTokenizerFast:
        """The vocabulary as a Hugging Face tokenizer: same normalisation and ids as `encode`, without padding."""
        pad, bos, eos, unk = SPECIALS
        return word_level_tokenizer(self.words, pad=pad, bos=bos, eos=eos, unk=unk)


@dataclass(frozen=True)
class CaptionerSpec(TrainingDefense):
    """Architecture and training recipe of a captioner. `seed` fixes init and batch order; the training-time
    defense fields, all off by default, are inherited from `TrainingDefense`.

    cnn-lstm reads `feature_dim`, `embed_dim`, `hidden_dim` and `norm`; vit-gpt2 reads `width`, `layers`,
    `heads` (for the encoder and the decoder alike, MLPs 4 x width) and `patch_size`. `hf-<model_type>` reads
    `extra["config_dir"]`, a Hugging Face directory of that model type whose config, tokenizer and image
    processor it copies (its weights are not read); `image_size` and the sizes are the directory's then."""

    arch: str = "cnn-lstm"
    image_size: int = 32
    feature_dim: int = 256
    embed_dim: int = 256
    hidden_dim: int = 512
    width: int = 128
    layers: int = 2
    heads: int = 4
    patch_size: int = 8
    max_len: int = 48
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def norm(self) -> str:
        """cnn-lstm's normalisation after each convolution: "batch", or "group" under DP-SGD (batch norm mixes
        the examples of a batch); `extra["norm"]` sets it explicitly (e.g. an undefended group-norm baseline)."""
        norm = self.extra.get("norm", "group" if self.dp_noise_multiplier is not None else "batch")
        if norm not in ("batch", "group"):
            raise ValueError(f"captioner norm {norm!r} must be 'batch' or 'group'")
        return norm


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int, uniforms: torch.Tensor) -> torch.Tensor:
    """One step of sampled decoding for captioners (temperature and top-k sampling; Fan et al. 2018).

    `logits` is (batch, vocab), `uniforms` (batch,) draws in [0, 1), one per row: row i takes the token where
    uniforms[i] falls in the cumulative softmax(logits / temperature) over its `top_k` largest logits
    (inverse-CDF sampling; `top_k` larger than the vocabulary means all of it), so a row's token depends on its
    own draw only, never on the other rows of the batch. Returns int64 token ids (batch,). `temperature <= 0`
    or `top_k == 1` is greedy decoding, the argmax (first index on ties), and reads no draw.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if temperature <= 0 or top_k == 1:
        return logits.argmax(dim=-1)
    if uniforms.shape != (logits.shape[0],):
        raise ValueError(f"need one draw per row: uniforms of shape ({logits.shape[0]},), got {tuple(uniforms.shape)}")
    k = min(int(top_k), logits.shape[-1])
    values, indices = torch.topk(logits.float(), k, dim=-1)
    cdf = torch.softmax(values / temperature, dim=-1).cumsum(-1)
    choice = (cdf < uniforms.to(cdf)[:, None]).sum(-1, keepdim=True).clamp(max=k - 1)
    return indices.gather(-1, choice).squeeze(-1)


def decoding_draws(n: int, steps: int, seed: int) -> np.ndarray:
    """Row-ordered draws for sampled decoding of `n` captions of up to `steps` tokens, from one seed: for callers
    that key nothing (a release keys each query's draws on its content, `Release.decoding_draws`)."""
    return np.random.default_rng(seed).random((n, steps))


def _norm_layer(kind: str, channels: int) -> nn.Module:
    """Batch norm, or group norm in 8 groups (4 to 16 channels each: one channel per group, instance norm, is
    ill-conditioned on the corpus's flat backgrounds)."""
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(8, channels)


class CnnLstmCaptioner(nn.Module):
    """CNN encoder -> linear feature_dim -> initial LSTM state; LSTM decoder over word embeddings, with the
    image feature also fed at every step (beside the word embedding): conditioned only through the
    initial state, the decoder learned the captions' language but barely the image in 30 epochs."""

    def __init__(self, vocab_size: int, spec: CaptionerSpec) -> None:
        super().__init__()
        norm = spec.norm
        self.encoder = nn.Sequential(
            # Batch norm after each convolution: it learns the input scale, which differs between domains
            # (the sketch corpus's bright paper, raw [0, 1] pixels) and made the encoder learn slowly. Group
            # norm under DP-SGD (`CaptionerSpec.norm`).
            nn.Conv2d(3, 32, 3, padding=1), _norm_layer(norm, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), _norm_layer(norm, 64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), _norm_layer(norm, 128), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(128 * 4, spec.feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.init_h = nn.Linear(spec.feature_dim, spec.hidden_dim)
        self.init_c = nn.Linear(spec.feature_dim, spec.hidden_dim)
        self.embed = nn.Embedding(vocab_size, spec.embed_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(spec.embed_dim + spec.feature_dim, spec.hidden_dim, batch_first=True)
        self.out = nn.Linear(spec.hidden_dim, vocab_size)

    def _state(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.init_h(f).unsqueeze(0), self.init_c(f).unsqueeze(0)

    def _inputs(self, tokens: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embed(tokens), f.unsqueeze(1).expand(-1, tokens.shape[1], -1)], dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for tokens[:, 1:] given tokens[:, :-1]."""
        f = self.encoder(images)
        out, _ = self.lstm(self._inputs(tokens[:, :-1], f), self._state(f))
        return self.out(out)

    @torch.no_grad()
    def generate(
        self, images: torch.Tensor, max_len: int, temperature: float = 0.0, draws: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Greedy decoding (the paper's; `temperature` 0) or top-k sampled decoding (the `sampled_decoding`
        defense, step t of row i reading draws[i, t], `sample_next_token`): ids of shape (batch, max_len + 1),
        stopping at EOS."""
        f = self.encoder(images)
        state = self._state(f)
        token = torch.full((len(images), 1), BOS, dtype=torch.long, device=images.device)
        out = []
        for t in range(max_len + 1):
            step, state = self.lstm(self._inputs(token, f), state)
            draw = None if draws is None else draws[:, t]
            token = sample_next_token(self.out(step)[:, -1], temperature, SAMPLED_DECODING_TOP_K, draw)[:, None]
            out.append(token)
        return torch.cat(out, dim=1)


class HuggingFaceCaptioner(nn.Module):
    """A `transformers` image-to-text model (VisionEncoderDecoder, BLIP, GIT, ...) behind the captioners'
    forward/greedy interface. `pad` follows each caption's end in the tokens it is given: PAD in a vocabulary's
    encoding, IGNORE in its tokenizer's (`CaptionerBundle.encode`)."""

    def __init__(self, hf: transformers.PreTrainedModel, pad: int) -> None:
        super().__init__()
        self.hf, self.pad = hf, pad

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for tokens[:, 1:] given tokens[:, :-1] (tokens[:, 0] is the start token)."""
        return teacher_forced_logits(self.hf, pixels, tokens, tokens != self.pad)

    @torch.no_grad()
    def generate(
        self, pixels: torch.Tensor, max_len: int, temperature: float = 0.0, draws: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Greedy (`temperature` 0) or top-k sampled decoding by the model's own `generate` (from the image alone):
        ids of shape (batch, at most max_len + 2), the start token first. Sampling is `sample_next_token` on each
        step's logits with row i's draw draws[i, t] (a logits processor that leaves only the sampled token, which
        greedy search then takes), so all archs sample one way."""
        processors = transformers.LogitsProcessorList()
        if temperature > 0:
            processors.append(_DrawnToken(temperature, draws))
        return self.hf.generate(
            pixel_values=pixels, max_length=max_len + 2, do_sample=False, num_beams=1, logits_processor=processors
        )


class _DrawnToken(transformers.LogitsProcessor):
    """Keeps only the token `sample_next_token` draws at this step (step t: t tokens after the start token)."""

    def __init__(self, temperature: float, draws: torch.Tensor) -> None:
        self.temperature, self.draws = temperature, draws

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        draw = self.draws[:, input_ids.shape[1] - 1]
        token = sample_next_token(scores, self.temperature, SAMPLED_DECODING_TOP_K, draw)
        return torch.full_like(scores, float("-inf")).scatter(1, token[:, None], 0.0)


@dataclass
class CaptionerBundle:
    """A captioner with its input and output conversions. Hugging Face archs carry their image processor and
    tokenizer; `vocab` is None for a Hugging Face directory not built here (its tokenizer encodes the captions)."""

    model: CnnLstmCaptioner | HuggingFaceCaptioner
    vocab: Vocabulary | None
    spec: CaptionerSpec
    image_processor: transformers.BaseImageProcessor | None = None
    tokenizer: transformers.PreTrainedTokenizerBase | None = None

    def pixels(self, image_uris: list[str]) -> torch.Tensor:
        """The model's input tensor for image files (the image processor's `pixel_values` where there is one)."""
        if self.image_processor is None:
            return load_image_tensor(image_uris, self.spec.image_size)
        images = [open_rgb(uri) for uri in image_uris]
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    @property
    def image_size(self) -> int:
        """The side of the model's input images: its vision config's for a Hugging Face model, else the spec's."""
        if isinstance(self.model, HuggingFaceCaptioner):
            return image_size(self.model.hf.config) or self.spec.image_size
        return self.spec.image_size

    @property
    def pad(self) -> int:
        """What follows a caption's end in `encode`'s rows: PAD with a vocabulary, else IGNORE."""
        return PAD if self.vocab is not None else IGNORE

    def encode(self, captions: list[str]) -> torch.Tensor:
        """Teacher-forced token rows of captions: the start token, the tokens to predict, then `pad`; by the
        vocabulary (BOS, words cut at `max_len`, EOS) or by the model's own tokenizer and conventions
        (`hf_captioner.caption_tokens`)."""
        if self.vocab is not None:
            return torch.tensor([self.vocab.encode(c, self.spec.max_len) for c in captions], dtype=torch.long)
        return caption_tokens(self.model.hf, self.tokenizer, captions, self.spec.max_len)

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Captions for generated ids, normalised as the caption metrics normalise."""
        if self.tokenizer is None:
            return [self.vocab.decode(row) for row in ids]
        return [normalise_caption(t) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _build_cnn_lstm(vocab: Vocabulary, spec: CaptionerSpec) -> CaptionerBundle:
    return CaptionerBundle(CnnLstmCaptioner(len(vocab.words), spec), vocab, spec)


def _build_vit_gpt2(vocab: Vocabulary, spec: CaptionerSpec) -> CaptionerBundle:
    encoder = transformers.ViTConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.width,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=4 * spec.width,
    )
    decoder = transformers.GPT2Config(
        vocab_size=len(vocab.words),
        n_positions=spec.max_len + 2,
        n_embd=spec.width,
        n_layer=spec.layers,
        n_head=spec.heads,
        resid_pdrop=0.0,  # no dropout anywhere, as in cnn-lstm: the target memorises its members
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu",
        is_decoder=True,
        add_cross_attention=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        decoder_start_token_id=BOS,
    )
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS, BOS, EOS, PAD
    hf = transformers.VisionEncoderDecoderModel(config=config)
    hf.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=BOS, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, max_length=spec.max_len + 2
    )
    processor = transformers.ViTImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size},
        resample=Image.BICUBIC,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return CaptionerBundle(HuggingFaceCaptioner(hf, PAD), vocab, spec, processor, vocab.tokenizer())


ARCHS: dict[str, Callable[[Vocabulary, CaptionerSpec], CaptionerBundle]] = {
    "cnn-lstm": _build_cnn_lstm,
    "vit-gpt2": _build_vit_gpt2,
}


def build_captioner(vocab: Vocabulary, spec: CaptionerSpec) -> CaptionerBundle:
    """An untrained captioner of a registered architecture, or of an `hf-<model_type>` directory's config (whose
    tokenizer replaces `vocab`), initialised from `spec.seed`."""
    if spec.arch.startswith(HF_ARCH_PREFIX):
        return _build_from_config(spec)
    if spec.arch not in ARCHS:
        raise ValueError(
            f"unknown captioner architecture {spec.arch!r}; registered: {sorted(ARCHS)}, or {HF_ARCH_PREFIX}"
            '<model_type> with extra["config_dir"]'
        )
    torch.manual_seed(spec.seed)
    return ARCHS[spec.arch](vocab, spec)


def _build_from_config(spec: CaptionerSpec) -> CaptionerBundle:
    """A model of `extra["config_dir"]`'s config (`hf_captioner.untrained_twin`), which must be of the spec's model
    type; its captions cut at the model's text positions (`max_len` at most those less the start and end)."""
    folder = spec.extra.get("config_dir")
    if not isinstance(folder, str):
        raise ValueError(f'captioner arch {spec.arch!r} needs extra["config_dir"], a Hugging Face directory')
    hf, tokenizer, processor = untrained_twin(Path(folder), spec.seed)
    if HF_ARCH_PREFIX + hf.config.model_type != spec.arch:
        raise ValueError(f"{folder} holds a {hf.config.model_type} model, not the spec's arch {spec.arch!r}")
    positions = text_positions(hf.config)
    if positions is not None and spec.max_len + 2 > positions:
        spec = replace(spec, max_len=positions - 2)
    return CaptionerBundle(HuggingFaceCaptioner(hf, IGNORE), None, spec, processor, tokenizer)


def train_captioner(
    bundle: CaptionerBundle,
    image_uris: list[str],
    captions: list[str],
    device: str | None = None,
    facts: dict[str, Any] | None = None,
    validation: tuple[list[str], list[str]] | None = None,
) -> list[float]:
    """Teacher-forced cross-entropy training in place, with `bundle.spec.defense` switched on; returns the
    mean loss of each epoch. What the defense did (pairs trained on and held out, epochs, best epoch, DP's
    sampling, steps and epsilon) is written into `facts` when given. `validation` (image uris, captions) are
    held-out pairs for early stopping, instead of a `validation_fraction` of the training pairs. The captions are
    encoded by `bundle.encode` (a Hugging Face directory's own tokenizer where there is no vocabulary) and the
    loss ignores what follows each caption's end."""
    spec = bundle.spec
    defense = spec.defense
    dev = device_for(device)
    image_uris, captions, train_idx, val_idx = split_pairs(image_uris, captions, validation, spec)
    if defense.augment > 0:  # keep [0, 1] pixels: augment them per batch, then apply the model's normalisation
        images = load_image_tensor(image_uris, bundle.image_size)
        augment = augmenter(defense.augment, spec.seed)
        normalise = _pixel_normalisation(bundle)
    else:
        images, augment, normalise = bundle.pixels(image_uris), None, None
    tokens, pad = bundle.encode(captions), bundle.pad
    model = bundle.model.to(dev).train()
    if defense.dp and not isinstance(model, CnnLstmCaptioner):
        raise ValueError(f"DP-SGD is implemented for the cnn-lstm captioner, not {spec.arch}")
    inputs = batch_inputs(images, augment, normalise, dev)

    def batch_loss(net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        tok = tokens[idx].to(dev)
        return _caption_loss(net(inputs(idx, True), tok), tok, per_caption=defense.dp, pad=pad)

    history, stopping, restored, private = fit_pairs(
        model, spec, train_idx, val_idx, dev,
        lambda params: torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay),
        batch_loss, lambda net: _validation_loss(net, inputs, tokens, val_idx, spec, dev, pad), coupled=False,
    )  # fmt: skip
    if facts is not None:
        facts.update(training_facts(history, train_idx, val_idx, validation, stopping, restored, private))
    return history


def _caption_loss(logits: torch.Tensor, tok: torch.Tensor, per_caption: bool, pad: int = PAD) -> torch.Tensor:
    """Cross-entropy of the next tokens (`pad` ignored): the mean over the batch's tokens, or (`per_caption`, for
    DP-SGD) the mean over captions of each caption's mean, so that no caption's loss depends on another's length."""
    if not per_caption:
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1), ignore_index=pad
        )
    return _token_nll(logits, tok, pad).mean()


def _token_nll(logits: torch.Tensor, tok: torch.Tensor, pad: int) -> torch.Tensor:
    """Each caption's mean over its tokens (those before `pad`) of -log p(token | image, previous tokens)."""
    target = tok[:, 1:]
    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=pad, reduction="none")
    real = (target != pad).float()
    return (token_loss * real).sum(1) / real.sum(1).clamp(min=1)


@torch.no_grad()
def _validation_loss(
    net: nn.Module, inputs: Callable, tokens: torch.Tensor, val_idx: torch.Tensor, spec: CaptionerSpec,
    dev: torch.device, pad: int,
) -> float:  # fmt: skip
    """The mean token cross-entropy on the held-out pairs."""
    net.eval()
    total, count = 0.0, 0
    for start in range(0, len(val_idx), spec.batch_size):
        idx = val_idx[start : start + spec.batch_size]
        tok = tokens[idx].to(dev)
        logits = net(inputs(idx, False), tok)
        target = tok[:, 1:].reshape(-1)
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=pad,
                                             reduction="sum").item()  # fmt: skip
        count += int((target != pad).sum())
    net.train()
    return total / max(count, 1)


def _pixel_normalisation(bundle: CaptionerBundle) -> Callable[[torch.Tensor], torch.Tensor]:
    """[0, 1] images to the model's input: identity for cnn-lstm, the image processor's mean and std otherwise."""
    processor = bundle.image_processor
    if processor is None or not getattr(processor, "do_normalize", False):
        return lambda x: x
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)
    return lambda x: (x - mean.to(x.device)) / std.to(x.device)


def generate_captions(
    bundle: CaptionerBundle,
    image_uris: list[str],
    batch_size: int = 256,
    device: str | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    draws: np.ndarray | None = None,
) -> list[str]:
    """Captions for image files, in order: greedy, or with `temperature` > 0 sampled from the top-k tokens
    (`sample_next_token`), image i's step t reading draws[i, t] (`caption_steps` columns; default: row-ordered
    draws from `seed`, `decoding_draws`). A caption depends on its image and its draws only, not on the batch."""
    dev = device_for(device)
    model = bundle.model.to(dev).eval()
    steps = caption_steps(bundle.spec.max_len)
    if draws is None:
        draws = decoding_draws(len(image_uris), steps, seed)
    if draws.shape != (len(image_uris), steps):
        raise ValueError(f"need ({len(image_uris)}, {steps}) decoding draws, got {draws.shape}")
    draws_t = torch.as_tensor(draws, dtype=torch.float64, device=dev)
    out: list[str] = []
    for start in range(0, len(image_uris), batch_size):
        pixels = bundle.pixels(image_uris[start : start + batch_size]).to(dev)
        rows = draws_t[start : start + batch_size]
        out += bundle.decode(model.generate(pixels, bundle.spec.max_len, temperature, rows).cpu().tolist())
    return out


def caption_steps(max_len: int) -> int:
    """Decoding steps of a caption of at most `max_len` words: the words and EOS."""
    return max_len + 1


@torch.no_grad()
def caption_nll(
    bundle: CaptionerBundle, image_uris: list[str], captions: list[str], batch_size: int = 256,
    device: str | None = None,
) -> np.ndarray:  # fmt: skip
    """Teacher-forced negative log-likelihood of each caption given its image: the mean over the caption's
    predicted tokens (`CaptionerBundle.encode`: its words, cut at `max_len`, and EOS; for a Hugging Face directory
    not built here, its tokenizer's ids as the model's own loss reads them) of -log p(token | image, previous
    tokens), the loss training minimises (and a Hugging Face model's own `labels=` loss on that caption)."""
    out = [
        _token_nll(logits, tok, bundle.pad).cpu().numpy()
        for logits, tok in _teacher_forced(bundle, image_uris, captions, batch_size, device)
    ]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


@torch.no_grad()
def caption_token_logprobs(
    bundle: CaptionerBundle,
    image_uris: list[str],
    captions: list[str],
    batch_size: int = 256,
    device: str | None = None,
) -> list[np.ndarray]:
    """Each caption's log p(token | image, previous tokens) of its predicted tokens, in order (float64; the
    tokens `caption_nll` averages: its value is minus each array's mean)."""
    out = []
    for logits, tok in _teacher_forced(bundle, image_uris, captions, batch_size, device):
        target = tok[:, 1:]
        logp = -nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=bundle.pad, reduction="none")
        out += [row[real].cpu().numpy().astype(np.float64) for row, real in zip(logp, target != bundle.pad)]
    return out


def _teacher_forced(
    bundle: CaptionerBundle, image_uris: list[str], captions: list[str], batch_size: int, device: str | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float logits, token rows) of each batch of (image, caption) pairs, the model in eval mode."""
    if len(image_uris) != len(captions):
        raise ValueError(f"{len(image_uris)} images but {len(captions)} captions")
    dev = device_for(device)
    model = bundle.model.to(dev).eval()
    for start in range(0, len(image_uris), batch_size):
        tok = bundle.encode(captions[start : start + batch_size]).to(dev)
        yield model(bundle.pixels(image_uris[start : start + batch_size]).to(dev), tok).float(), tok


def save_captioner(bundle: CaptionerBundle, out_dir: str | os.PathLike, info: dict[str, Any]) -> tuple[Path, str]:
    """Save a captioner folder; return (path of `model.safetensors`, its sha256).

    cnn-lstm: safetensors without metadata plus `config.json` (spec, vocabulary, info). Hugging Face archs:
    `save_pretrained` of model, tokenizer and image processor, plus `m4i.json` (spec, info)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "model.safetensors"
    config = {"family": FAMILY, "spec": asdict(bundle.spec), **info}
    if isinstance(bundle.model, HuggingFaceCaptioner):
        bundle.model.hf.save_pretrained(out)  # safetensors metadata {"format": "pt"} only: same weights, same bytes
        bundle.tokenizer.save_pretrained(out)
        bundle.image_processor.save_pretrained(out)
        (out / M4I_FILE).write_text(json.dumps(config, indent=1))
    else:
        save_file({k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}, str(ckpt))
        (out / "config.json").write_text(json.dumps({**config, "vocab": list(bundle.vocab.words)}, indent=1))
    return ckpt, sha256_file(ckpt)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "not found: captioner checkpoint incomplete")


def _load_cnn_lstm(folder: Path, config: dict[str, Any]) -> CaptionerBundle:
    config_path, ckpt = folder / "config.json", folder / "model.safetensors"
    try:
        spec = CaptionerSpec(**config["spec"])
        vocab = Vocabulary(words=tuple(config["vocab"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{config_path} is not a captioner config: {exc!r}") from exc
    if not ckpt.is_file():
        raise FileNotFoundError(f"captioner checkpoint incomplete: {ckpt} not found")
    bundle = build_captioner(vocab, spec)
    try:
        bundle.model.load_state_dict(load_file(str(ckpt)), strict=True)
    except Exception as exc:
        raise ValueError(f"{ckpt} does not hold a {spec.arch} captioner matching {config_path}: {exc}") from exc
    return bundle


def _load_hugging_face(folder: Path, model_type: str) -> CaptionerBundle:
    """Any Hugging Face image-to-text directory (`models.hf_captioner`); with our `m4i.json` the spec comes back as
    well, and the vocabulary of a vit-gpt2."""
    tokenizer, processor = tokenizer_and_image_processor(folder, "captioner checkpoint")
    hf = load_model(folder, model_type)
    vocab = None
    if (folder / M4I_FILE).is_file():
        try:
            spec = CaptionerSpec(**_read_json(folder / M4I_FILE)["spec"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{folder / M4I_FILE} is not a captioner spec: {exc!r}") from exc
        if spec.arch in ARCHS:
            words = tokenizer.get_vocab()
            vocab = Vocabulary(words=tuple(sorted(words, key=words.__getitem__)))
    else:
        config = hf.config
        spec = CaptionerSpec(
            arch=(
                f"{config.encoder.model_type}-{config.decoder.model_type}"
                if model_type == "vision-encoder-decoder"
                else HF_ARCH_PREFIX + model_type
            ),
            image_size=image_size(config) or CaptionerSpec.image_size,
            max_len=min(
                hf.generation_config.max_length or CaptionerSpec.max_len + 2,
                text_positions(config) or CaptionerSpec.max_len + 2,
            )
            - 2,
        )
    model = HuggingFaceCaptioner(hf, IGNORE if vocab is None else PAD)
    return CaptionerBundle(model, vocab, spec, processor, tokenizer)


def load_captioner(checkpoint_dir: str | os.PathLike, device: str | None = None) -> CaptionerBundle:
    """Load a captioner folder: ours (any arch) or any Hugging Face image-to-text directory (VisionEncoderDecoder,
    BLIP, GIT, ...; `models.hf_captioner`).

    A missing or corrupt file, or a config.json of no captioner, is a clear error naming it (FileNotFoundError,
    ValueError)."""
    folder = Path(checkpoint_dir)
    config_path = folder / "config.json"
    config = _read_json(config_path)
    if "model_type" in config:
        bundle = _load_hugging_face(folder, check_captioner_config(config_path, config))
    elif config.get("family") == FAMILY:
        bundle = _load_cnn_lstm(folder, config)
    else:
        raise ValueError(f'{config_path} names neither a model_type nor family "captioner"; supported: {SUPPORTED}')
    bundle.model.to(torch.device(device or "cpu")).eval()
    return bundle


def _build(spec: CaptionerSpec, captions: list[str]) -> CaptionerBundle:
    return build_captioner(Vocabulary.build(captions), spec)


def _train(
    bundle: CaptionerBundle, image_uris: list[str], captions: list[str], spec: CaptionerSpec, device: str | None,
    facts: dict[str, Any], validation: tuple[list[str], list[str]] | None,
) -> list[float]:  # fmt: skip
    return train_captioner(bundle, image_uris, captions, device, facts, validation)


def _sidecar(spec: CaptionerSpec) -> dict[str, Any]:
    return {}  # `save_captioner` writes the spec itself


TRAINING = FamilyTraining(build=_build, train=_train, sidecar=_sidecar, save=save_captioner)
train_and_save = functools.partial(train_family_and_save, TRAINING)
"""`train_and_save(spec, image_uris, captions, out_dir, info, device=None, threads=None, validation=None)`: build
the vocabulary from the training captions alone, then build, train (`train_captioner`) and save one captioner;
returns (sha256, loss per epoch, parameter count, facts), the facts saved beside the spec (as "defense") for a
defended spec. `models.training.train_and_save`.

A shadow of a Hugging Face target's own architecture: `train_and_save(CaptionerSpec(arch="hf-<model_type>",
extra={"config_dir": "<the target's directory>"}, epochs=..., batch_size=..., lr=..., max_len=..., seed=...),
...)` trains a randomly initialised model of the directory's config on the directory's tokenizer (its weights are
not read; the vocabulary built from the captions is not used) and saves it as a Hugging Face directory (model,
tokenizer, image processor, `m4i.json` with the spec), which `load_captioner` loads and `families` recognises as
arch `hf-<model_type>`, the target's own."""
