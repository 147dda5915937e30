"""Read an image-caption manifest (JSONL, CSV or Parquet) into `records` and `rejects` frames.

A manifest row names a local image (`image`, relative to the manifest's folder or absolute) and its
`caption`, with optional `record_id`, `split` and `metadata`. Every row ends up in exactly one of the
two outputs: rows in = records + rejects (README, Storage contract).

`record_id` is a content hash of the image bytes and the caption, so re-ingesting is idempotent and
an exact duplicate is detected (and rejected with reason `duplicate`).

Usable-but-odd images (grayscale, CMYK, alpha, 16-bit) are kept: every loader converts to RGB. Rows
that are not UTF-8 (reason `not_utf8`), CSV rows with an unterminated quote or the wrong number of fields
(`malformed_row`: the rest of the file is still read), images outside the source's `root` folder
(`outside_root`), files that are not regular files or larger than `max_bytes` (`not_a_file`, `file_too_large`,
from a stat: nothing is read), images whose header claims more than `max_pixels` pixels (`image_too_large`,
checked before decoding: a decompression bomb never reaches memory), and truncated or non-image files
(`undecodable_image`) are rejected.

`RowRules` holds a source's limits and its column mapping (`columns: {image: filepath, caption: title}`
reads open_clip's CSV convention); manifest columns that are not record fields are kept in `metadata`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
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
MAX_FILE_BYTES = 64 << 20  # an encoded image of MAX_PIXELS as PNG is well under this
FIELDS = ("image", "caption", "record_id", "split", "metadata")  # a manifest row's own fields
CSV_MAX_CONTINUATION_LINES = 16  # a quoted CSV field may span lines; an unterminated quote stops here


@dataclass(frozen=True)
class RowRules:
    """What one source's rows may be: `max_pixels` per image (header), `max_bytes` per image file (stat),
    `root` (a folder every local image must resolve into, or None) and `columns` (record field -> the
    source's column name)."""

    max_pixels: int = MAX_PIXELS
    max_bytes: int = MAX_FILE_BYTES
    root: Path | None = None
    columns: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.columns) - set(FIELDS))
        if unknown:
            raise ValueError(f"columns maps unknown record fields {unknown}; known: {', '.join(FIELDS)}")
        names = list(self.columns.values())
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"columns must map each field to a distinct column name: {dict(self.columns)}")

    def mapped(self, row: dict) -> dict:
        """A source row with its columns renamed to record fields; other columns go into `metadata`."""
        if any(k.startswith("__") for k in row):
            return row
        renamed = {field: row[column] for field, column in self.columns.items() if column in row}
        rest = {k: v for k, v in row.items() if k not in set(self.columns.values())}
        renamed |= {k: rest.pop(k) for k in FIELDS if k in rest and k not in renamed}
        if rest:  # extra columns: kept as metadata (a role column, a URL, ...)
            metadata = renamed.get("metadata")
            if isinstance(metadata, str):
                try:
                    metadata = json.loads(metadata)
                except ValueError:
                    pass
            if metadata is not None and not isinstance(metadata, dict):
                metadata = {"metadata": metadata}
            renamed["metadata"] = {**rest, **(metadata or {})}
        return renamed


DEFAULT_RULES = RowRules()


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
        yield from _csv_rows(path)
    elif suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    else:
        raise ValueError(f"{path}: unsupported manifest format {suffix!r} (expected .jsonl, .csv or .parquet)")


def _csv_record(lines: list[bytes], width: int | None) -> list[str] | str:
    """The fields of one CSV record made of `lines`, or why it is not one ("open" while a quote is open)."""
    try:
        text = b"".join(lines).decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not_utf8:byte {exc.start} of the row is not UTF-8"
    try:
        parsed = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as exc:
        return "open" if "EOF" in str(exc) or "end of data" in str(exc).lower() else f"malformed:{exc}"
    if len(parsed) != 1:
        return "open" if not parsed else f"malformed:{len(parsed)} records on one line"
    if width is not None and len(parsed[0]) != width:
        return f"malformed:{len(parsed[0])} fields, the header has {width}"
    return parsed[0]


def _csv_rows(path: Path) -> Iterator[dict]:
    """A CSV manifest's rows, one at a time. A quoted field may span lines; a row whose quote never closes
    (within CSV_MAX_CONTINUATION_LINES lines), or whose field count differs from the header's, is one
    malformed row and reading goes on with the next line."""
    with open(path, "rb") as handle:
        lines = [line for line in handle]
    header: list[str] | None = None
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        width = None if header is None else len(header)
        first = record = _csv_record(lines[i : i + 1], width)
        end = i + 1
        while record == "open" and end < min(len(lines), i + CSV_MAX_CONTINUATION_LINES):
            end += 1
            record = _csv_record(lines[i:end], width)
        if header is None:
            if isinstance(record, str):
                raise ValueError(f"{path}: the header line is not CSV ({record.partition(':')[2] or record})")
            header = [name.lstrip("\ufeff").strip() for name in record]
            i = end
            continue
        if isinstance(record, list):
            yield dict(zip(header, record))
            i = end
        elif record.startswith("not_utf8:"):
            yield {"__not_utf8__": record.partition(":")[2]}
            i = end
        else:  # unterminated quote or a wrong field count: this line alone is the bad row
            why = "unterminated quote" if first == "open" else record.partition(":")[2]
            yield {"__malformed__": f"line {i + 1}: {why}"}
            i += 1


def _load_image(row: dict, base: Path | None, rules: RowRules) -> tuple[str, str] | tuple[None, tuple[str, bytes]]:
    """(reason, detail) when the row's image cannot be read, else (None, (image_uri, bytes)).

    A row names a local file in `image` (relative to `base`), or carries the bytes already read from a
    container in `__image_bytes__` with their `__image_uri__` (a WebDataset tar member, a Hugging Face row),
    at most `rules.max_bytes` of them. A local file is confined to `rules.root` and stat-checked (a regular file
    of at most `rules.max_bytes`) before it is read."""
    if "__image_bytes__" in row:
        if len(row["__image_bytes__"]) > rules.max_bytes:
            return "file_too_large", f"{row['__image_uri__']}: {len(row['__image_bytes__'])} bytes > {rules.max_bytes}"
        return None, (row["__image_uri__"], row["__image_bytes__"])
    image = row.get("image")
    if not isinstance(image, str) or not image:
        return "malformed_row", "missing 'image' field"
    path = Path(image) if os.path.isabs(image) or base is None else base / image
    resolved = path.resolve()  # symbolic links followed: a link out of the root is outside it
    if rules.root is not None and not resolved.is_relative_to(rules.root.resolve()):
        return "outside_root", f"{path} is not under {rules.root}"
    try:
        info = resolved.stat()
    except OSError:
        return "missing_file", str(path)
    if not stat.S_ISREG(info.st_mode):
        return "not_a_file", f"{path} is not a regular file"
    if info.st_size > rules.max_bytes:
        return "file_too_large", f"{path}: {info.st_size} bytes > {rules.max_bytes}"
    with open(resolved, "rb") as handle:
        return None, (str(resolved), handle.read(rules.max_bytes + 1)[: rules.max_bytes])


def check_row(row: dict, base: Path | None, rules: RowRules = DEFAULT_RULES) -> tuple[str, str] | tuple[None, dict]:
    """Return (reason, detail) for an unusable row, or (None, the record's normalised fields)."""
    max_pixels = rules.max_pixels
    if "__malformed__" in row:
        return "malformed_row", row["__malformed__"]
    if "__not_utf8__" in row:
        return "not_utf8", row["__not_utf8__"]
    if "__unreadable__" in row:
        return "unreadable_tar_member", row["__unreadable__"]
    if "__unreadable_shard__" in row:
        return "unreadable_shard", row["__unreadable_shard__"]
    if "__too_large__" in row:
        return "file_too_large", f"{row['__too_large__']} > {rules.max_bytes}"
    caption = row.get("caption")
    if "__image_bytes__" not in row and not isinstance(row.get("image"), str):
        return "malformed_row", "missing 'image' field"
    if not isinstance(caption, str) or not caption.strip():
        return "empty_caption", "caption is missing or whitespace"
    caption = " ".join(caption.split())
    if len(caption) > MAX_CAPTION_CHARS:
        return "overlong_caption", f"{len(caption)} characters > {MAX_CAPTION_CHARS}"
    reason, loaded = _load_image(row, base, rules)
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
    rows: Iterable[tuple[str, dict]], dataset: str, base: Path | None = None, rules: RowRules = DEFAULT_RULES
) -> Ingested:
    """Validate (locator, row) pairs from any source; every row becomes a record or a reject (never raises
    per row). Exact duplicates (same image bytes and caption) after the first are rejected."""
    records, rejects, seen, rows_in = [], [], set(), 0
    for locator, row in rows:
        rows_in += 1
        reason, fields = check_row(rules.mapped(row), base, rules)
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


def read_manifest(path: str | os.PathLike, dataset: str, rules: RowRules = DEFAULT_RULES) -> Ingested:
    """Validate every row of a manifest; return usable records and rejects (never raises per row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    rows = ((f"{path.name}:{i + 1}", row) for i, row in enumerate(_read_rows(path)))
    return ingest_rows(rows, dataset, path.parent, rules)
