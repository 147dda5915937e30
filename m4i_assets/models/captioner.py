"""Image captioner adapter: the M^4I paper's target architecture, trainable on a CPU in minutes.

Hu et al., NeurIPS 2022 (M^4I), section 4.1: an image encoder mapped linearly to 256 dimensions and a
one-layer LSTM decoder (embedding 256, hidden 512) with greedy decoding. The paper's encoder is an
ImageNet ResNet-152 / VGG-16; no pretrained weights can be fetched here, so the encoder is a small CNN
trained from scratch with the decoder (recorded in the checkpoint's config). The paper caps captions
at 20 tokens; the embedded corpus's captions are longer, so `max_len` is a config value.

The vocabulary is built offline from the training captions (word level, after the same
normalisation the caption metrics use). Checkpoints are a safetensors state dict plus a JSON config
holding the vocabulary; `sha256` of the safetensors file names the model version, as for CLIPs.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from m4i_assets.metrics.captions import normalise_caption
from m4i_assets.models.checkpoints import sha256_file

FAMILY = "captioner"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


def tokenize(text: str) -> list[str]:
    """The words of a caption under the caption metrics' normalisation (one tokenisation for both)."""
    return normalise_caption(text).split()


@dataclass(frozen=True)
class Vocabulary:
    words: tuple[str, ...]  # index -> word, the specials first

    @classmethod
    def build(cls, captions: list[str], min_count: int = 1) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words=SPECIALS + tuple(kept))

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


@dataclass(frozen=True)
class CaptionerSpec:
    """Architecture and training recipe of a CNN+LSTM captioner. `seed` fixes init and batch order."""

    arch: str = "cnn-lstm"
    image_size: int = 32
    feature_dim: int = 256
    embed_dim: int = 256
    hidden_dim: int = 512
    max_len: int = 48
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    extra: dict = field(default_factory=dict)


class CnnLstmCaptioner(nn.Module):
    """CNN encoder -> linear feature_dim -> initial LSTM state; LSTM decoder over word embeddings."""

    def __init__(self, vocab_size: int, spec: CaptionerSpec) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(128 * 4, spec.feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.init_h = nn.Linear(spec.feature_dim, spec.hidden_dim)
        self.init_c = nn.Linear(spec.feature_dim, spec.hidden_dim)
        self.embed = nn.Embedding(vocab_size, spec.embed_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(spec.embed_dim, spec.hidden_dim, batch_first=True)
        self.out = nn.Linear(spec.hidden_dim, vocab_size)

    def _state(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder(images)
        return self.init_h(f).unsqueeze(0), self.init_c(f).unsqueeze(0)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for tokens[:, 1:] given tokens[:, :-1]."""
        out, _ = self.lstm(self.embed(tokens[:, :-1]), self._state(images))
        return self.out(out)

    @torch.no_grad()
    def greedy(self, images: torch.Tensor, max_len: int) -> torch.Tensor:
        """Greedy decoding (the paper's): ids of shape (batch, max_len + 1), stopping at EOS."""
        state = self._state(images)
        token = torch.full((len(images), 1), BOS, dtype=torch.long, device=images.device)
        out = []
        for _ in range(max_len + 1):
            step, state = self.lstm(self.embed(token), state)
            token = self.out(step).argmax(-1)
            out.append(token)
        return torch.cat(out, dim=1)


@dataclass
class CaptionerBundle:
    model: CnnLstmCaptioner
    vocab: Vocabulary
    spec: CaptionerSpec


def load_image_tensor(uris: list[str], size: int) -> torch.Tensor:
    """Images as float tensors in [0, 1], resized to `size` (bicubic), channels first."""
    arrays = []
    for uri in uris:
        with Image.open(uri) as im:
            rgb = im.convert("RGB").resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(rgb, dtype=np.float32) / 255)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def build_captioner(vocab: Vocabulary, spec: CaptionerSpec) -> CaptionerBundle:
    if spec.arch != "cnn-lstm":
        raise ValueError(f"unknown captioner architecture {spec.arch!r}; this adapter builds 'cnn-lstm'")
    torch.manual_seed(spec.seed)
    return CaptionerBundle(CnnLstmCaptioner(len(vocab.words), spec), vocab, spec)


def train_captioner(
    bundle: CaptionerBundle, image_uris: list[str], captions: list[str], device: str | None = None
) -> list[float]:
    """Teacher-forced cross-entropy training in place; returns the mean loss of each epoch."""
    spec = bundle.spec
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images = load_image_tensor(image_uris, spec.image_size)
    tokens = torch.tensor([bundle.vocab.encode(c, spec.max_len) for c in captions])
    model = bundle.model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)
    history = []
    for _ in range(spec.epochs):
        order = torch.randperm(len(images), generator=gen)
        losses = []
        for start in range(0, len(order), spec.batch_size):
            idx = order[start : start + spec.batch_size]
            tok = tokens[idx].to(dev)
            logits = model(images[idx].to(dev), tok)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1), ignore_index=PAD
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
    model.eval()
    return history


def generate_captions(
    bundle: CaptionerBundle, image_uris: list[str], batch_size: int = 256, device: str | None = None
) -> list[str]:
    """Greedy captions for image files, in order."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = bundle.model.to(dev).eval()
    out: list[str] = []
    for start in range(0, len(image_uris), batch_size):
        images = load_image_tensor(image_uris[start : start + batch_size], bundle.spec.image_size).to(dev)
        out += [bundle.vocab.decode(ids) for ids in model.greedy(images, bundle.spec.max_len).cpu().tolist()]
    return out


def save_captioner(bundle: CaptionerBundle, out_dir: str | os.PathLike, info: dict) -> tuple[Path, str]:
    """safetensors weights (no metadata: the hash depends on the weights alone) plus `config.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "model.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}, str(ckpt))
    config = {"family": FAMILY, "spec": asdict(bundle.spec), "vocab": list(bundle.vocab.words), **info}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return ckpt, sha256_file(ckpt)


def load_captioner(checkpoint_dir: str | os.PathLike, device: str | None = None) -> CaptionerBundle:
    """Load a saved captioner folder; a missing or corrupt file is a clear error naming it."""
    folder = Path(checkpoint_dir)
    config_path, ckpt = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, ckpt):
        if not path.is_file():
            raise FileNotFoundError(f"captioner checkpoint incomplete: {path} not found")
    try:
        config = json.loads(config_path.read_text())
        spec = CaptionerSpec(**config["spec"])
        vocab = Vocabulary(words=tuple(config["vocab"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{config_path} is not a captioner config: {exc}") from exc
    bundle = build_captioner(vocab, spec)
    try:
        bundle.model.load_state_dict(load_file(str(ckpt)), strict=True)
    except Exception as exc:
        raise ValueError(f"{ckpt} does not hold a {spec.arch} captioner matching {config_path}: {exc}") from exc
    bundle.model.to(torch.device(device or "cpu")).eval()
    return bundle
