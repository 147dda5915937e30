"""Embedding signals: L2-normalised image and text embeddings of records under one model version.

Records stream through in batches (`record_batches`): each batch's images are decoded and eval-preprocessed
by a pool of threads (PIL decodes and resizes without holding the GIL) while one of them tokenises its
captions, and nothing of a record outlives its batch but its two embeddings. Runs on CUDA with autocast
when present, else on the CPU. Computed once per (model version, record) and shared by every attack
(PLATFORM.md, asset graph).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from m4i_assets.data.images import open_rgb
from m4i_assets.models.clip import ClipBundle
from m4i_assets.models.device import device_for

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


@functools.cache
def map_large_buffers() -> None:
    """Have glibc serve allocations of 1 MiB and more (a batch's pixels and activations) by mmap, returned to
    the system when freed. By default glibc raises that threshold to the largest block freed so far, after
    which every batch's buffers land in the heap and fragment it: the augment stage's peak RSS grew with the
    records it streamed (bench/scaling.py: 1,647 MiB at 1,000 candidates, 2,621 at 4,000). A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


CHUNK = 16  # images one decode task handles: small enough to balance the threads, large enough to be cheap


def decode_plan(dev: torch.device) -> tuple[int, int]:
    """(decode threads, batches prefetched) for a model on `dev`. On the CPU the model's forward has every
    core it was given (`torch.get_num_threads()`), so decoding must not overlap it: the next batch is decoded
    between forwards, by as many threads as the forward uses. On CUDA the cores are free while the device
    works: up to 8 threads decode two batches ahead."""
    if dev.type == "cuda":
        return min(8, len(os.sched_getaffinity(0))), 2
    return torch.get_num_threads(), 0


def record_batches(
    image_uris: Sequence[str],
    preprocess: Callable,
    batch_size: int,
    captions: Sequence[str] | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    threads: int = 1,
    prefetch: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(images, tokens) of consecutive batches of records, in record order: `preprocess(open_rgb(uri))`
    stacked, and `tokenizer(captions)` of the batch (None without captions). `prefetch` batches are being
    prepared while the caller works on the one yielded (0: the next batch starts when the caller asks)."""
    if captions is not None and len(captions) != len(image_uris):
        raise ValueError(f"{len(image_uris)} images but {len(captions)} captions")

    def decode(uris: Sequence[str]) -> torch.Tensor:
        return torch.stack([preprocess(open_rgb(uri)) for uri in uris])

    def submit(pool: ThreadPoolExecutor, start: int) -> tuple[Future | None, list[Future]]:
        stop = min(start + batch_size, len(image_uris))
        # the captions first: tokenising holds the GIL, which the decodes mostly release
        tokens = pool.submit(tokenizer, list(captions[start:stop])) if captions is not None else None
        chunks = [pool.submit(decode, image_uris[i : min(i + CHUNK, stop)]) for i in range(start, stop, CHUNK)]
        return tokens, chunks

    map_large_buffers()
    starts = iter(range(0, len(image_uris), batch_size))
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="m4i-decode") as pool:
        pending = deque(submit(pool, start) for start in itertools.islice(starts, prefetch + 1))
        while pending:
            tokens, chunks = pending.popleft()
            images = torch.cat([chunk.result() for chunk in chunks])
            yield images.pin_memory() if pin_memory else images, tokens.result() if tokens is not None else None
            start = next(starts, None)
            if start is not None:
                pending.append(submit(pool, start))


def tensor_batches(
    images: torch.Tensor, tokens: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of images and tokens already in memory (the reference the streamed path must equal)."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size], tokens[start : start + batch_size]


@torch.no_grad()
def encode_batches(
    bundle: ClipBundle, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Encode matched (images, tokens) batches; returns float32 normalised embeddings (n x d each)."""
    dev = device_for(device)
    model = bundle.model.to(dev).eval()
    img_out, txt_out = [], []
    for images, tokens in batches:
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            img = model.encode_image(images.to(dev, non_blocking=True), normalize=True)
            txt = model.encode_text(tokens.to(dev, non_blocking=True), normalize=True)
        img_out.append(img.float().cpu())
        txt_out.append(txt.float().cpu())
    if not img_out:
        return np.zeros((0, bundle.embed_dim), np.float32), np.zeros((0, bundle.embed_dim), np.float32)
    return torch.cat(img_out).numpy(), torch.cat(txt_out).numpy()


def embed_records(
    bundle: ClipBundle,
    image_uris: Sequence[str],
    captions: Sequence[str],
    batch_size: int = 256,
    device: str | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings (each n x d, L2-normalised) for records given by file and caption, streamed
    in batches (`threads`: decode threads, by default `decode_plan`'s)."""
    dev = device_for(device)
    plan_threads, prefetch = decode_plan(dev)
    batches = record_batches(image_uris, bundle.preprocess, batch_size, captions, bundle.tokenizer,
                             threads or plan_threads, prefetch, pin_memory=dev.type == "cuda")  # fmt: skip
    return encode_batches(bundle, batches, device)
