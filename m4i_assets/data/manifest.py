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
import json
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl
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


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                row = {"__not_utf8__": f"byte {exc.start} of the row is not UTF-8"}
            except json.JSONDecodeError as exc:
                row = {"__malformed__": f"invalid JSON: {exc.msg}"}
            rows.append(row if isinstance(row, dict) else {"__malformed__": "row is not an object"})
        return rows
    if suffix == ".csv":
        # Lossy decoding keeps one row per line; a replacement character marks the rows that were not UTF-8.
        return [
            {**row, "__not_utf8__": "a field is not UTF-8"} if any("\ufffd" in (v or "") for v in row.values()) else row
            for row in pl.read_csv(path, infer_schema=False, encoding="utf8-lossy").to_dicts()
        ]
    if suffix == ".parquet":
        return pl.read_parquet(path).to_dicts()
    raise ValueError(f"{path}: unsupported manifest format {suffix!r} (expected .jsonl, .csv or .parquet)")


def _check_row(row: dict, base: Path, max_pixels: int) -> tuple[str, str] | tuple[None, dict]:
    """Return (reason, detail) for an unusable row, or (None, normalised fields)."""
    if "__malformed__" in row:
        return "malformed_row", row["__malformed__"]
    if "__not_utf8__" in row:
        return "not_utf8", row["__not_utf8__"]
    image, caption = row.get("image"), row.get("caption")
    if not isinstance(image, str) or not image:
        return "malformed_row", "missing 'image' field"
    if not isinstance(caption, str) or not caption.strip():
        return "empty_caption", "caption is missing or whitespace"
    caption = " ".join(caption.split())
    if len(caption) > MAX_CAPTION_CHARS:
        return "overlong_caption", f"{len(caption)} characters > {MAX_CAPTION_CHARS}"
    path = Path(image) if os.path.isabs(image) else base / image
    if not path.is_file():
        return "missing_file", str(path)
    data = path.read_bytes()
    if not data:
        return "empty_file", str(path)
    try:
        with Image.open(path) as im:
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
        "image_uri": str(path.resolve()),
        "caption": caption,
        "width": width,
        "height": height,
        "split": row.get("split"),
        "metadata": metadata if isinstance(metadata, str) or metadata is None else json.dumps(metadata, sort_keys=True),
    }


def read_manifest(path: str | os.PathLike, dataset: str, max_pixels: int = MAX_PIXELS) -> Ingested:
    """Validate every row of a manifest; return usable records and rejects (never raises per row)."""
    path = Path(path)
    rows = _read_rows(path)
    records, rejects, seen = [], [], set()
    for i, row in enumerate(rows):
        locator = f"{path.name}:{i + 1}"
        reason, fields = _check_row(row, path.parent, max_pixels)
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
        rows_in=len(rows),
    )
