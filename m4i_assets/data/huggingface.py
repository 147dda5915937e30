"""Hugging Face datasets: Parquet files as the hub stores them, and `Dataset.save_to_disk` folders.

A Parquet file's image column is a struct {bytes, path} (the `Image()` feature, as `Dataset.to_parquet` and the
hub write it); plain binary bytes and a path string are read too. A `save_to_disk` folder holds Arrow IPC stream
files (`data-00000-of-00001.arrow`), listed in its `state.json` under `_data_files`. `path` is a Parquet file, a
glob of them, a folder of `*.parquet`, or a `save_to_disk` folder; one shard is one file.

A file is read in bounded chunks (`CHUNK_ROWS` rows: Parquet batch by batch within a row group, Arrow record
batch by record batch), and each row becomes one row for `manifest.ingest_rows`. Images are never extracted:
the stored bytes are checked (`max_bytes`, `max_pixels` from the header, a full decode) and a record's
`image_uri` addresses its row (`images.hf_row_uri`: `hfrow:///abs/file.parquet?row=17&column=image`), which
`images.open_rgb` reads back from the one row group that holds it. A cell with no bytes but a `path` names a
file (relative to the data file's folder) and is read like a manifest's image: `root`, `missing_file`,
`file_too_large` apply. A row's locator is `<file>:<row>`, the row 0-based as in the URI.

Columns (`columns: {image: img, caption: text, split: split}`, all optional): the image is column `image` (or
the one column the file's features declare an `Image()`), the caption the first of `caption` and `text`; the
rest is mapped as a manifest's columns are (`RowRules.mapped`): `split` fills `records.split`, every other
column is kept in `metadata` (a `ClassLabel` as its name; bytes as their length), so it can be an audit's
role column. Columns whose names start with `__` (a pandas index) are dropped.

Rows in = records + rejects: an image that does not decode is `undecodable_image`, a row without an image
`malformed_row`, a missing caption `empty_caption`; a row group (or the rest of an Arrow file) that cannot be
read is one `unreadable_shard` reject and reading goes on with the next; a file that is not Parquet or Arrow at
all is one `unreadable_shard` reject naming the file.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from m4i_assets.data.images import hf_row_uri, image_cell
from m4i_assets.data.manifest import DEFAULT_RULES, Ingested, RowRules, ingest_rows

CHUNK_ROWS = 64  # rows turned into Python objects at a time
CAPTION_COLUMNS = ("caption", "text")
READ_ERRORS = (pa.ArrowException, OSError, ValueError)


def hf_files(path: str) -> list[Path]:
    """The data files of a source's `path`: a `save_to_disk` folder's Arrow files (from `state.json`), a folder's
    `*.parquet`, or the Parquet files a glob matches, sorted."""
    folder = Path(path)
    if folder.is_dir() and (folder / "dataset_dict.json").is_file():
        raise ValueError(f"{folder} is a DatasetDict folder: name one split's folder (e.g. {folder / 'train'})")
    if folder.is_dir() and (folder / "state.json").is_file():
        try:
            state = json.loads((folder / "state.json").read_text())
            names = [entry["filename"] for entry in state["_data_files"]]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{folder / 'state.json'} is not a save_to_disk state file: {exc}") from exc
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder / 'state.json'} lists missing data files {missing}")
        return sorted(folder / name for name in names)
    pattern = os.path.join(path, "*.parquet") if folder.is_dir() else path
    return sorted(Path(p) for p in glob.glob(pattern) if os.path.isfile(p))


def _features(schema: pa.Schema) -> dict:
    """The `datasets` features stored in a file's schema metadata (empty when there are none)."""
    try:
        info = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        features = info.get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    return features if isinstance(features, dict) else {}


def column_mapping(schema: pa.Schema, columns: Mapping[str, str]) -> RowRules:
    """The record field -> column mapping of one file: `columns`, with the image and caption columns' defaults."""
    names, taken, features = set(schema.names), set(columns.values()), _features(schema)
    mapping = dict(columns)
    if "image" not in mapping:
        images = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image" and n in names]
        mapping["image"] = "image" if "image" in names or len(images) != 1 else images[0]
    if "caption" not in mapping:
        found = [c for c in CAPTION_COLUMNS if c in names and c not in taken]
        if found:
            mapping["caption"] = found[0]
    return RowRules(columns=mapping)


def _class_labels(schema: pa.Schema) -> dict[str, list[str]]:
    """column -> label names of the file's top-level `ClassLabel` columns."""
    features = _features(schema)
    return {
        name: feature["names"]
        for name, feature in features.items()
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list)
    }


def _json_safe(value: object) -> object:
    """A cell as a JSON value: bytes as their length, dates as ISO strings, anything else unknown as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _row(path: Path, index: int, cells: dict, mapping: RowRules, labels: dict[str, list[str]]) -> dict:
    """One file row as a row for `check_row`: the image's stored bytes and row URI (or its file path), the
    caption, `split` and `metadata` as a manifest row's columns map to them."""
    cells = {k: v for k, v in cells.items() if not k.startswith("__")}
    for column, names in labels.items():
        value = cells.get(column)
        if isinstance(value, int) and 0 <= value < len(names):
            cells[column] = names[value]
    row = mapping.mapped(cells)
    cell = row.pop("image", None)
    if isinstance(row.get("metadata"), dict):
        row["metadata"] = _json_safe(row["metadata"])
    if cell is None:
        return row  # no image: check_row's `malformed_row`
    data, file = image_cell(cell)
    if data is not None:
        return {**row, "__image_bytes__": data, "__image_uri__": hf_row_uri(path, index, mapping.columns["image"])}
    if file is not None:
        return {**row, "image": file}  # read as a manifest's image, relative to the data file's folder
    return {"__malformed__": f"column {mapping.columns['image']!r} holds neither image bytes nor a path"}


def _parquet_chunks(path: Path) -> tuple[pa.Schema, Iterator[tuple[int, pa.RecordBatch | str]]]:
    """A Parquet file's schema and its (first row, batch or why the rows are unreadable), row group by row group."""
    handle = pq.ParquetFile(path)

    def chunks() -> Iterator[tuple[int, pa.RecordBatch | str]]:
        start = 0
        try:
            for group in range(handle.num_row_groups):
                rows, done = handle.metadata.row_group(group).num_rows, 0
                try:
                    for batch in handle.iter_batches(batch_size=CHUNK_ROWS, row_groups=[group]):
                        yield start + done, batch
                        done += batch.num_rows
                except READ_ERRORS as exc:
                    lost = f"rows {start + done}-{start + rows - 1} (row group {group})"
                    yield start + done, f"{lost} are unreadable: {exc}"
                start += rows
        finally:
            handle.close()

    return handle.schema_arrow, chunks()


def _arrow_chunks(path: Path) -> tuple[pa.Schema, Iterator[tuple[int, pa.RecordBatch | str]]]:
    """An Arrow IPC file's or stream's schema and its (first row, batch or why the rest is unreadable),
    memory-mapped, record batch by record batch."""
    source = pa.memory_map(str(path))
    try:
        if source.read(6) == b"ARROW1":
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
    except BaseException:
        source.close()
        raise

    def chunks() -> Iterator[tuple[int, pa.RecordBatch | str]]:
        start = 0
        try:
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except READ_ERRORS as exc:
                    yield start, f"the rest of the file, from row {start}, is unreadable: {exc}"
                    return
                for offset in range(0, batch.num_rows, CHUNK_ROWS):
                    yield start + offset, batch.slice(offset, CHUNK_ROWS)
                start += batch.num_rows
        finally:
            source.close()

    return reader.schema, chunks()


def file_rows(path: Path, columns: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
    """(locator, row) per row of one Parquet or Arrow file, streamed in chunks of `CHUNK_ROWS` rows."""
    try:
        with open(path, "rb") as handle:
            parquet = handle.read(4) == b"PAR1"
        schema, chunks = (_parquet_chunks if parquet else _arrow_chunks)(path)
    except READ_ERRORS as exc:  # not Parquet, not Arrow: one reject for the file
        yield path.name, {"__unreadable_shard__": f"{path} is not a readable Parquet or Arrow file: {exc}"}
        return
    mapping, labels = column_mapping(schema, columns), _class_labels(schema)
    for start, chunk in chunks:
        if isinstance(chunk, str):
            yield f"{path.name}:{start}", {"__unreadable_shard__": f"{path}: {chunk}"}
            continue
        try:
            cells = chunk.to_pylist()
        except READ_ERRORS as exc:
            detail = f"{path}: rows {start}-{start + chunk.num_rows - 1} do not convert: {exc}"
            yield f"{path.name}:{start}", {"__unreadable_shard__": detail}
            continue
        for offset, row in enumerate(cells):
            yield f"{path.name}:{start + offset}", _row(path, start + offset, row, mapping, labels)


def read_huggingface_file(path: str | os.PathLike, dataset: str, rules: RowRules = DEFAULT_RULES) -> Ingested:
    """Records and rejects of one Parquet or Arrow file (rows in = file rows = records + rejects, but for a
    file or row group that cannot be read: one reject each)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Hugging Face data file not found: {path}")
    rows = file_rows(path, rules.columns)
    return ingest_rows(rows, dataset, path.parent, RowRules(rules.max_pixels, rules.max_bytes, rules.root))
