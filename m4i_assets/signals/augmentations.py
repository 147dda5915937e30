"""Augmentation signals for AEA (Ko et al., ICCV 2023, section 3.3): image embeddings under fixed
image transformations T_k, applied batched on tensors on the model's device.

The transforms are the paper's candidate families with *fixed, seeded* parameters, so every model
version sees exactly the same augmented inputs and deltas are comparable across versions. They act on
images in [0, 1] at the model's resolution (the eval preprocessing minus its final normalisation);
the normalisation is applied after the transform. AugMix draws its operations from a generator seeded
per batch from `seed`, so it is deterministic too.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F

from m4i_assets.models.clip import ClipBundle, split_normalisation
from m4i_assets.models.device import device_for
from m4i_assets.signals.batches import decode_images, map_batches

Transform = Callable[[torch.Tensor], torch.Tensor]


def _resized_crop(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.resized_crop(x, top=h // 8, left=w // 16, height=3 * h // 4, width=3 * w // 4, size=[h, w], antialias=True)


def _posterize(x: torch.Tensor) -> torch.Tensor:
    return F.posterize((x * 255).round().to(torch.uint8), bits=3).float() / 255


def _colour_jitter(x: torch.Tensor) -> torch.Tensor:
    x = F.adjust_brightness(x, 1.25)
    x = F.adjust_contrast(x, 0.75)
    x = F.adjust_saturation(x, 1.4)
    return F.adjust_hue(x, 0.06)


def _augmix(seed: int) -> Transform:
    op = T.AugMix(severity=3, mixture_width=3)

    def apply(x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return op((x * 255).round().to(torch.uint8)).float() / 255

    return apply


def transform_registry(seed: int = 0) -> dict[str, Transform]:
    """The AEA transform families, each with fixed parameters (name -> batched tensor function)."""
    return {
        "random_resized_crop": _resized_crop,
        "rotation": lambda x: F.rotate(x, angle=15.0),
        "affine": lambda x: F.affine(x, angle=0.0, translate=[2, 1], scale=0.9, shear=[8.0, 0.0]),
        "horizontal_flip": F.horizontal_flip,
        "vertical_flip": F.vertical_flip,
        "gaussian_blur": lambda x: F.gaussian_blur(x, kernel_size=[5, 5], sigma=[1.0, 1.0]),
        "colour_jitter": _colour_jitter,
        "autocontrast": F.autocontrast,
        "sharpness": lambda x: F.adjust_sharpness(x, 2.5),
        "posterize": _posterize,
        "augmix": _augmix(seed),
    }


def augmented_image_embeddings(
    bundle: ClipBundle,
    image_uris: Sequence[str],
    transforms: dict[str, Transform],
    batch_size: int = 256,
    device: str | None = None,
) -> dict[str, np.ndarray]:
    """For each transform, the L2-normalised image embeddings of T_k(x) (n x d, record order kept).

    Each image is decoded once; all transforms run on the decoded batch where the model runs (`map_batches`)."""
    dev = device_for(device)
    model = bundle.model.to(dev).eval()
    to_tensor, normalise = split_normalisation(bundle.preprocess)

    @torch.no_grad()
    def compute(images: torch.Tensor) -> torch.Tensor:
        images = images.to(dev, non_blocking=True)
        embeddings = []
        for transform in transforms.values():
            with torch.autocast(dev.type, enabled=dev.type == "cuda"):
                embeddings.append(model.encode_image(normalise(transform(images).clamp(0, 1)), normalize=True))
        return torch.stack(embeddings).float().cpu()  # (K, batch, d)

    def prepare(start: int, stop: int) -> torch.Tensor:
        return decode_images(image_uris[start:stop], to_tensor)

    # written in place, batch by batch: no per-batch chunks kept
    out = np.empty((len(transforms), len(image_uris), bundle.embed_dim), np.float32)
    batches = map_batches(len(image_uris), batch_size, prepare, compute, dev)
    for start, batch in zip(range(0, len(image_uris), batch_size), batches):
        out[:, start : start + batch.shape[1]] = batch.numpy()
    return dict(zip(transforms, out))
