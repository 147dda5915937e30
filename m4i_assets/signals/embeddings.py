"""Embedding signals: L2-normalised image and text embeddings of records under one model version.

Records stream through in batches (`signals.batches.map_batches`: forked workers decode, preprocess, tokenise and
encode whole batches on the CPU; decode workers feed the device on CUDA), and nothing of a record outlives its
batch but its two embeddings. Runs on CUDA with autocast when present, else on the CPU. Computed once per
(model version, record) and shared by every attack (README, What the demo does).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from m4i_assets.models.clip import ClipBundle
from m4i_assets.models.device import device_for
from m4i_assets.signals.batches import decode_images, map_batches


def tensor_batches(
    images: torch.Tensor, tokens: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of images and tokens already in memory (the reference the streamed path must equal)."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size], tokens[start : start + batch_size]


@torch.no_grad()
def encode_pair(
    model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 image and text embeddings of one batch, on the CPU (autocast on CUDA)."""
    with torch.autocast(dev.type, enabled=dev.type == "cuda"):
        img = model.encode_image(images.to(dev, non_blocking=True), normalize=True)
        txt = model.encode_text(tokens.to(dev, non_blocking=True), normalize=True)
    return img.float().cpu(), txt.float().cpu()


def encode_batches(
    bundle: ClipBundle, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Encode matched (images, tokens) batches in this process; returns float32 normalised embeddings (n x d
    each)."""
    dev = device_for(device)
    model = bundle.model.to(dev).eval()
    pairs = [encode_pair(model, images, tokens, dev) for images, tokens in batches]
    if not pairs:
        return np.zeros((0, bundle.embed_dim), np.float32), np.zeros((0, bundle.embed_dim), np.float32)
    return torch.cat([p[0] for p in pairs]).numpy(), torch.cat([p[1] for p in pairs]).numpy()


def embed_records(
    bundle: ClipBundle,
    image_uris: Sequence[str],
    captions: Sequence[str],
    batch_size: int = 256,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings (each n x d, L2-normalised) for records given by file and caption, streamed in
    batches of `batch_size` records (`map_batches`)."""
    if len(captions) != len(image_uris):
        raise ValueError(f"{len(image_uris)} images but {len(captions)} captions")
    dev = device_for(device)
    model = bundle.model.to(dev).eval()

    def prepare(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_images(image_uris[start:stop], bundle.preprocess), bundle.tokenizer(list(captions[start:stop]))

    img = np.empty((len(image_uris), bundle.embed_dim), np.float32)
    txt = np.empty_like(img)
    batches = map_batches(len(image_uris), batch_size, prepare, lambda batch: encode_pair(model, *batch, dev), dev)
    for start, (batch_img, batch_txt) in zip(range(0, len(image_uris), batch_size), batches):
        img[start : start + len(batch_img)] = batch_img.numpy()
        txt[start : start + len(batch_txt)] = batch_txt.numpy()
    return img, txt
