"""Embedding signals: L2-normalised image and text embeddings of records under one model version.

Images are decoded and preprocessed by DataLoader workers with the model's own eval preprocessing;
captions are tokenised once up front. Runs on CUDA with autocast when present, else on the CPU.
Computed once per (model version, record) and shared by every attack (PLATFORM.md, asset graph).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from m4i_assets.data.images import open_rgb
from m4i_assets.models.clip import ClipBundle
from m4i_assets.models.device import device_for


class ImageFiles(Dataset):
    """Decodes image files and applies a preprocessing transform, one per item."""

    def __init__(self, image_uris: list[str], preprocess) -> None:
        self.image_uris = image_uris
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.image_uris)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(open_rgb(self.image_uris[i]))


@torch.no_grad()
def encode_batches(
    bundle: ClipBundle,
    images: torch.utils.data.Dataset | torch.Tensor,
    tokens: torch.Tensor,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode matched (image, token) pairs in batches; returns float32 normalised embeddings."""
    dev = device_for(device)
    model = bundle.model.to(dev).eval()
    loader = DataLoader(
        images,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    img_out, txt_out, start = [], [], 0
    for batch in loader:
        tok = tokens[start : start + len(batch)]
        start += len(batch)
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            img = model.encode_image(batch.to(dev, non_blocking=True), normalize=True)
            txt = model.encode_text(tok.to(dev, non_blocking=True), normalize=True)
        img_out.append(img.float().cpu())
        txt_out.append(txt.float().cpu())
    return torch.cat(img_out).numpy(), torch.cat(txt_out).numpy()


def embed_records(
    bundle: ClipBundle,
    image_uris: list[str],
    captions: list[str],
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings (each n x d, L2-normalised) for records given by file and caption."""
    if len(image_uris) != len(captions):
        raise ValueError(f"{len(image_uris)} images but {len(captions)} captions")
    dataset = ImageFiles(image_uris, bundle.preprocess)
    return encode_batches(bundle, dataset, bundle.tokenizer(captions), batch_size, num_workers, device)
