"""CLIP model adapter over open_clip: one way to build, train, save and load any CLIP.

Architectures come from open_clip's config registry; the project's small CPU-trainable configs live
in `configs/` and are registered at import (open_clip builds them offline with `pretrained=None`).
Checkpoints are safetensors state dicts with a sha256; `model_version` derives from that hash.

Training is open_clip's symmetric InfoNCE (`ClipLoss`) on the eval-preprocessed images, with no
augmentation by default: the embedded default deliberately trains a target that memorises its
members, so membership ground truth produces a measurable signal (ATTACKS.md section 1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from m4i_assets.data.images import open_rgb
from m4i_assets.models.checkpoints import sha256_file
from m4i_assets.models.device import device_for

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)

FAMILY = "clip"


@dataclass(frozen=True)
class ClipTrainSpec:
    """How to train a CLIP. `seed` fixes initialisation and batch order."""

    arch: str = "m4i-tiny-vit"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClipBundle:
    """A built CLIP with the functions that prepare its inputs."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    arch: str


def build_clip(arch: str, seed: int = 0) -> ClipBundle:
    """Build an untrained CLIP of a registered architecture with seeded initialisation."""
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {arch!r}; registered: {sorted(open_clip.list_models())[:8]}...")
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    return ClipBundle(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(arch), arch=arch)


def embed_dim(arch: str) -> int:
    """The joint embedding width of a registered architecture."""
    return int(open_clip.get_model_config(arch)["embed_dim"])


def load_images(bundle: ClipBundle, image_uris: list[str]) -> torch.Tensor:
    """Decode and eval-preprocess images into one tensor (small training sets fit in memory)."""
    return torch.stack([bundle.preprocess(open_rgb(uri)) for uri in image_uris])


def train_clip(
    bundle: ClipBundle, image_uris: list[str], captions: list[str], spec: ClipTrainSpec, device: str | None = None
) -> list[float]:
    """Train `bundle.model` in place on matched pairs; return the mean loss of each epoch."""
    dev = device_for(device)
    images = load_images(bundle, image_uris)
    tokens = bundle.tokenizer(captions)
    model = bundle.model.to(dev).train()
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    n = len(images)
    steps_per_epoch = max(1, n // spec.batch_size)
    total = steps_per_epoch * spec.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / max(1, spec.warmup_steps)) * 0.5 * (1 + np.cos(np.pi * min(s, total) / max(1, total)))
        ),
    )
    gen = torch.Generator().manual_seed(spec.seed)
    use_amp = dev.type == "cuda"
    history = []
    for _ in range(spec.epochs):
        order = torch.randperm(n, generator=gen)
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * spec.batch_size : (step + 1) * spec.batch_size]
            with torch.autocast(dev.type, enabled=use_amp):
                img_f, txt_f, scale = model(images[idx].to(dev), tokens[idx].to(dev))[:3]
                loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # open_clip clamps the learned temperature at 100
                model.logit_scale.clamp_(0, np.log(100))
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
    model.eval()
    return history


def train_and_save(
    spec: ClipTrainSpec,
    image_uris: list[str],
    captions: list[str],
    out_dir: str | os.PathLike,
    info: dict[str, Any],
    device: str | None = None,
    threads: int | None = None,
) -> tuple[str, list[float], int]:
    """Build, train and save one CLIP; return (sha256, loss per epoch, parameter count).

    Arguments are plain values, so this runs as well in a worker process (with `threads` torch
    threads) as in the caller's."""
    if threads:
        torch.set_num_threads(threads)
    bundle = build_clip(spec.arch, seed=spec.seed)
    history = train_clip(bundle, image_uris, captions, spec, device)
    _, sha = save_clip(
        bundle, out_dir, {**info, "train": asdict(spec), "n_train": len(image_uris), "loss_history": history}
    )
    return sha, history, sum(p.numel() for p in bundle.model.parameters())


def save_clip(bundle: ClipBundle, out_dir: str | os.PathLike, info: dict[str, Any]) -> tuple[Path, str]:
    """Save weights as safetensors plus a JSON sidecar; return (checkpoint path, sha256)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "model.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    # No safetensors metadata: it is a hash map whose order varies between runs, and the file's sha256
    # must depend on the weights alone (arch and family are in the JSON sidecar).
    save_file(state, str(ckpt))
    (out / "model.json").write_text(json.dumps({"arch": bundle.arch, "family": FAMILY, **info}, indent=2, default=str))
    return ckpt, sha256_file(ckpt)


def load_clip(arch: str, checkpoint: str | os.PathLike, device: str | None = None) -> ClipBundle:
    """Load a CLIP checkpoint; a missing, corrupt or mismatched file is a clear error naming it."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    bundle = build_clip(arch)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc
    try:
        bundle.model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not match architecture {arch!r}: {str(exc).splitlines()[0]}") from exc
    bundle.model.to(device_for(device)).eval()
    return bundle
