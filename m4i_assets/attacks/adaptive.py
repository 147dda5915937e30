"""The adaptive attacker's queries against randomized releases (Tramer et al. 2020; Aerni et al., CCS 2024).

A randomized release (noise on embeddings, sampled decoding) keys its randomness on what it is asked: the
same query always gets the same noise, so asking twice gains nothing. An attacker who knows the defense asks
k *variants* of a record that the model cannot tell apart but the defense's key can: the image re-encoded
(other PNG bytes, identical pixels) and the caption with other whitespace or case (identical tokens for a
lower-casing, whitespace-splitting tokenizer). Each variant draws fresh noise, and averaging the k released
embeddings shrinks the noise by about sqrt(k) while the signal stays.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, PngImagePlugin


def query_key(content: bytes | str) -> str:
    """What a release can key its randomness on: the sha256 of the query's bytes (an image) or text (a caption)."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    return hashlib.sha256(data).hexdigest()


def caption_variants(caption: str, k: int) -> list[str]:
    """k distinct spellings of a caption with the same words: the caption itself, then extra spaces between
    words or around it, and an upper-case first letter. A tokenizer that lower-cases and splits on whitespace
    (CLIP's BPE, this platform's word tokenizers) reads them all as the caption."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    words = caption.split()
    if not words:
        raise ValueError("cannot vary an empty caption")
    out, i = [caption], 0
    while len(out) < k:
        gaps = [" "] * (len(words) - 1)
        if gaps:
            gaps[i % len(gaps)] = " " * (2 + i // len(gaps))
        text = words[0] + "".join(g + w for g, w in zip(gaps, words[1:]))
        for candidate in (text, text + " ", " " + text, text[:1].upper() + text[1:]):
            if candidate not in out and len(out) < k:
                out.append(candidate)
        i += 1
    return out


def image_variants(image_bytes: bytes, k: int) -> list[bytes]:
    """k distinct encodings of one image with identical pixels: the original bytes, then PNG re-encodings
    at other compression levels, each carrying its index in a text chunk (so no two are byte-equal)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    out = [image_bytes]
    for j in range(1, k):
        info = PngImagePlugin.PngInfo()
        info.add_text("m4i-query", str(j))
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=j % 10, pnginfo=info)
        out.append(buf.getvalue())
    return out


def average_releases(releases: Sequence[np.ndarray]) -> np.ndarray:
    """The k-query estimate of a clean embedding: the mean of k released (n, d) unit embeddings, re-normalised."""
    if not releases:
        raise ValueError("need at least one release to average")
    mean = np.mean(np.stack([np.asarray(r, dtype=np.float64) for r in releases]), axis=0)
    norms = np.linalg.norm(mean, axis=-1, keepdims=True)
    return (mean / np.maximum(norms, np.finfo(np.float64).tiny)).astype(np.float32)


def _by_query(per_record: list[list[str]]) -> list[list[str]]:
    return [list(keys) for keys in zip(*per_record)]


def image_variant_keys(image_uris: Sequence[str], queries: int) -> list[list[str]]:
    """The keys of an attacker's `queries - 1` extra queries of each image as a release keyed on content sees
    them (the sha256 of each re-encoded variant): `queries - 1` lists of one key per image; empty for 1."""
    from m4i_assets.data.images import read_image_bytes

    if queries <= 1:
        return []
    return _by_query([[query_key(v) for v in image_variants(read_image_bytes(u), queries)[1:]] for u in image_uris])


def caption_variant_keys(captions: Sequence[str], queries: int) -> list[list[str]]:
    """The same for captions: the sha256 of each respelling (`caption_variants`)."""
    if queries <= 1:
        return []
    return _by_query([[query_key(v) for v in caption_variants(c, queries)[1:]] for c in captions])


def image_query_keys(image_uris: Sequence[str], queries: int) -> list[list[str]]:
    """Every query an attacker sends of each image, as a release keyed on content sees it: `queries` lists (the
    original bytes' sha256 first, then `image_variant_keys`) of one key per image."""
    from m4i_assets.data.images import read_image_bytes

    return [[query_key(read_image_bytes(u)) for u in image_uris], *image_variant_keys(image_uris, queries)]


def average_over_queries(per_query: Sequence[np.ndarray]) -> np.ndarray:
    """The k-query attacker's features of a sampled-decoding release (Tramer et al. 2020 against randomized
    outputs): the mean over the k queries of each record's features (an (n, m) array per query, e.g. the caption
    metrics of the caption released for that query, M^4I's MB features, Hu et al. 2022 section 3.2), which
    estimates the features' expectation under the sampling instead of one draw of them."""
    if not per_query:
        raise ValueError("need the features of at least one query")
    shapes = {np.shape(f) for f in per_query}
    if len(shapes) != 1:
        raise ValueError(f"every query's features need one shape, got {sorted(shapes)}")
    return np.mean(np.stack([np.asarray(f, dtype=np.float64) for f in per_query]), axis=0)
