"""Read an image-caption manifest (JSONL, CSV or Parquet) into `records` and `rejects` frames.

A manifest row names a local image (`image`, relative to the manifest's folder or absolute) and its
`caption`, with optional `record_id`, `split` and `metadata`. Every row ends up in exactly one of the
two outputs: rows in = records + rejects (PLATFORM.md, storage contract).

`record_id` is a content hash of the image bytes and the caption, so re-ingesting is idempotent and
an exact duplicate is detected (and rejected with reason `duplicate`).

Usable-but-odd images (grayscale, CMYK, alpha, 16-bit) are kept: every loader converts to RGB. Rows
that are not UTF-8 (reason `not_utf8`), images whose header claims more than `max_pixels` pixels
(`image_too_large`, checked before decoding: a decompression bomb never reaches memory), and truncated
or non-image files (`undecodable_image`) are rejected.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from PIL import Image

RECORD_SCHEMA = {
    "record_id": pl.Utf8,
    "dataset": pl.Utf8,
    "image_uri": pl.Utf8,
    "caption": pl.Utf8,
    "width": pl.Int32,
    "height": pl.Int32,
    "split": pl.Utf8,
    "metadata": pl.Utf8,
    "source_locator": pl.Utf8,
}
REJECT_SCHEMA = {"source": pl.Utf8, "locator": pl.Utf8, "reason": pl.Utf8, "detail": pl.Utf8}
MAX_CAPTION_CHARS = 1000
MAX_PIXELS = 40_000_000  # far above any real caption dataset's images, far below PIL's bomb limit


@dataclass(frozen=True)
class Ingested:
    records: pl.DataFrame
    rejects: pl.DataFrame
    rows_in: int


def record_id(image_bytes: bytes, caption: str) -> str:
    """Stable id: sha256 over the image bytes and the caption (first 16 hex digits)."""
    h = hashlib.sha256(image_bytes)
    h.update(b"\0")
    h.update(caption.encode("utf-8"))
    return h.hexdigest()[:16]


def _read_rows(path: Path) -> Iterator[dict]:
    """The manifest's rows, streamed (JSONL line by line, Parquet batch by batch)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    row = {"__not_utf8__": f"byte {exc.start} of the row is not UTF-8"}
                except json.JSONDecodeError as exc:
                    row = {"__malformed__": f"invalid JSON: {exc.msg}"}
                yield row if isinstance(row, dict) else {"__malformed__": "row is not an object"}
    elif suffix == ".csv":
        # Lossy decoding keeps one row per line; a replacement character marks the rows that were not UTF-8.
        for row in pl.read_csv(path, infer_schema=False, encoding="utf8-lossy").iter_rows(named=True):
            lossy = any("\ufffd" in (v or "") for v in row.values())
            yield {**row, "__not_utf8__": "a field is not UTF-8"} if lossy else row
    elif suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    else:
        raise ValueError(f"{path}: unsupported manifest format {suffix!r} (expected .jsonl, .csv or .parquet)")


def _load_image(row: dict, base: Path | None) -> tuple[str, str] | tuple[None, tuple[str, bytes]]:
    """(reason, detail) when the row's image cannot be read, else (None, (image_uri, bytes)).

    A row names a local file in `image` (relative to `base`), or carries the bytes already read from a
    container in `__image_bytes__` with their `__image_uri__` (a WebDataset tar member)."""
    if "__image_bytes__" in row:
        return None, (row["__image_uri__"], row["__image_bytes__"])
    image = row.get("image")
    if not isinstance(image, str) or not image:
        return "malformed_row", "missing 'image' field"
    path = Path(image) if os.path.isabs(image) or base is None else base / image
    if not path.is_file():
        return "missing_file", str(path)
    return None, (str(path.resolve()), path.read_bytes())


def check_row(row: dict, base: Path | None, max_pixels: int = MAX_PIXELS) -> tuple[str, str] | tuple[None, dict]:
    """Return (reason, detail) for an unusable row, or (None, the record's normalised fields)."""
    if "__malformed__" in row:
        return "malformed_row", row["__malformed__"]
    if "__not_utf8__" in row:
        return "not_utf8", row["__not_utf8__"]
    if "__unreadable__" in row:
        return "unreadable_tar_member", row["__unreadable__"]
    caption = row.get("caption")
    if "__image_bytes__" not in row and not isinstance(row.get("image"), str):
        return "malformed_row", "missing 'image' field"
    if not isinstance(caption, str) or not caption.strip():
        return "empty_caption", "caption is missing or whitespace"
    caption = " ".join(caption.split())
    if len(caption) > MAX_CAPTION_CHARS:
        return "overlong_caption", f"{len(caption)} characters > {MAX_CAPTION_CHARS}"
    reason, loaded = _load_image(row, base)
    if reason is not None:
        return reason, loaded
    uri, data = loaded
    if not data:
        return "empty_file", uri
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                return "image_too_large", f"{width}x{height} pixels > {max_pixels} (possible decompression bomb)"
            im.load()
    except Image.DecompressionBombError as exc:
        return "image_too_large", str(exc)
    except Exception as exc:  # PIL raises many types for undecodable input
        return "undecodable_image", f"{type(exc).__name__}: {exc}"
    metadata = row.get("metadata")
    return None, {
        "record_id": record_id(data, caption),
        "image_uri": uri,
        "caption": caption,
        "width": width,
        "height": height,
        "split": None if row.get("split") is None else str(row["split"]),
        "metadata": metadata if isinstance(metadata, str) or metadata is None else json.dumps(metadata, sort_keys=True),
    }


def ingest_rows(
    rows: Iterable[tuple[str, dict]], dataset: str, base: Path | None = None, max_pixels: int = MAX_PIXELS
) -> Ingested:
    """Validate (locator, row) pairs from any source; every row becomes a record or a reject (never raises
    per row). Exact duplicates (same image bytes and caption) after the first are rejected."""
    records, rejects, seen, rows_in = [], [], set(), 0
    for locator, row in rows:
        rows_in += 1
        reason, fields = check_row(row, base, max_pixels)
        if reason is None and fields["record_id"] in seen:
            reason, fields = "duplicate", f"same image bytes and caption as an earlier row ({fields['record_id']})"
        if reason is not None:
            rejects.append({"source": dataset, "locator": locator, "reason": reason, "detail": fields})
            continue
        seen.add(fields["record_id"])
        records.append({**fields, "dataset": dataset, "source_locator": locator})
    return Ingested(
        records=pl.DataFrame(records, schema=RECORD_SCHEMA),
        rejects=pl.DataFrame(rejects, schema=REJECT_SCHEMA),
        rows_in=rows_in,
    )


def read_manifest(path: str | os.PathLike, dataset: str, max_pixels: int = MAX_PIXELS) -> Ingested:
    """Validate every row of a manifest; return usable records and rejects (never raises per row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    rows = ((f"{path.name}:{i + 1}", row) for i, row in enumerate(_read_rows(path)))
    return ingest_rows(rows, dataset, path.parent, max_pixels)
