"""Where a record's image lives and how every loader opens it: one function, `open_rgb`.

An `image_uri` is a local file path, or a member of an uncompressed tar shard addressed by byte range
(`tar:///abs/shard.tar?member=key.jpg&offset=1536&size=4096`): a WebDataset image is read with one seek,
without extracting the shard or indexing it again. A Hugging Face dataset's image is a row of its Parquet or
Arrow file (`hfrow:///abs/train-00000.parquet?row=17&column=image`): the bytes stored in that row's image cell,
read from the one Parquet row group that holds it, or from the memory-mapped Arrow file. The last few row
groups and files read are cached per process (`HF_CACHE_ENTRIES`), so a batch of consecutive rows reads each
row group once.

Usable-but-odd images are normalised here, not rejected: grayscale, palette, CMYK and alpha images
become RGB; 16- and 32-bit integer images are rescaled to 8 bits (a plain `convert("RGB")` would clip
them to white).
"""

from __future__ import annotations

import bisect
import io
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote, unquote, urlencode, urlparse

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

TAR_SCHEME = "tar"
HF_ROW_SCHEME = "hfrow"
HF_CACHE_ENTRIES = 4  # row groups (Parquet) and memory-mapped files (Arrow) kept per process


def tar_member_uri(shard: str | Path, member: str, offset: int, size: int) -> str:
    """The `image_uri` of a tar member whose data starts at byte `offset` and is `size` bytes long."""
    query = urlencode({"member": member, "offset": offset, "size": size})
    return f"{TAR_SCHEME}://{quote(str(Path(shard).resolve()))}?{query}"


def hf_row_uri(path: str | Path, row: int, column: str) -> str:
    """The `image_uri` of the image in `column` of row `row` (0-based) of a Parquet or Arrow file."""
    return f"{HF_ROW_SCHEME}://{quote(str(Path(path).resolve()))}?{urlencode({'row': row, 'column': column})}"


def image_cell(cell: object) -> tuple[bytes | None, str | None]:
    """(stored bytes, file path) of a Hugging Face image cell: a struct {bytes, path} (the `Image()` feature),
    plain bytes, or a path string; (None, None) for anything else."""
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        data = bytes(data) if isinstance(data, (bytes, bytearray)) else None
        return data, (path if isinstance(path, str) else None)
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell), None
    return None, (cell if isinstance(cell, str) else None)


def _stamp(path: str) -> tuple[int, int]:
    """(mtime, size) of a file: part of every cache key, so a rewritten file is read again."""
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size


@lru_cache(maxsize=HF_CACHE_ENTRIES)
def _parquet_row_starts(path: str, stamp: tuple[int, int]) -> tuple[int, ...]:
    """The first row of each row group of a Parquet file, and its row count last."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    starts = [0]
    for k in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(k).num_rows)
    return tuple(starts)


@lru_cache(maxsize=HF_CACHE_ENTRIES)
def _parquet_group(path: str, stamp: tuple[int, int], group: int, column: str) -> pa.ChunkedArray:
    """One column of one row group of a Parquet file (nothing else of the file is read)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column)


@lru_cache(maxsize=HF_CACHE_ENTRIES)
def _arrow_table(path: str, stamp: tuple[int, int]) -> pa.Table:
    """An Arrow IPC file or stream (`Dataset.save_to_disk` writes streams), memory-mapped: nothing is copied. A
    stream cut short keeps the record batches before the cut (those its rows were ingested from)."""
    import pyarrow as pa

    source = pa.memory_map(path)
    if source.read(6) == b"ARROW1":
        return pa.ipc.open_file(source).read_all()
    source.seek(0)
    reader = pa.ipc.open_stream(source)
    batches = []
    try:
        for batch in reader:
            batches.append(batch)
    except (pa.ArrowException, OSError):
        pass
    return pa.Table.from_batches(batches, reader.schema)


def read_row_image(path: str, row: int, column: str) -> bytes:
    """The image bytes in `column` of row `row` of a Parquet or Arrow file; a cell with no bytes but a `path`
    is read from that file (relative to the data file's folder)."""
    stamp = _stamp(path)
    with open(path, "rb") as handle:
        parquet = handle.read(4) == b"PAR1"
    if parquet:
        starts = _parquet_row_starts(path, stamp)
        if not 0 <= row < starts[-1]:
            raise IndexError(f"{path} has {starts[-1]} rows, no row {row}")
        group = bisect.bisect_right(starts, row) - 1
        cell = _parquet_group(path, stamp, group, column)[row - starts[group]].as_py()
    else:
        table = _arrow_table(path, stamp)
        if not 0 <= row < table.num_rows:
            raise IndexError(f"{path} has {table.num_rows} rows, no row {row}")
        cell = table.column(column)[row].as_py()
    data, file = image_cell(cell)
    if data is not None:
        return data
    if file is None:
        raise ValueError(f"{path}: row {row} holds no image in column {column!r}")
    return (Path(path).parent / file).read_bytes()  # an absolute `file` stays absolute


def read_image_bytes(uri: str) -> bytes:
    """The encoded bytes behind an `image_uri` (a file path, a tar member URI or a Hugging Face row URI)."""
    if uri.startswith(f"{HF_ROW_SCHEME}://"):
        parsed = urlparse(uri)
        query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
        return read_row_image(unquote(parsed.path), int(query["row"]), query["column"])
    if not uri.startswith(f"{TAR_SCHEME}://"):
        return Path(uri).read_bytes()
    parsed = urlparse(uri)
    query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    offset, size = int(query["offset"]), int(query["size"])
    path = unquote(parsed.path)  # `tar_member_uri` quotes it
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise OSError(f"{path}: member {query.get('member')} is truncated ({len(data)} of {size} bytes)")
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB (integer images of more than 8 bits are rescaled, not clipped)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) <= 65535 else float(array.max())
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # alpha composited on white
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def open_rgb(uri: str) -> Image.Image:
    """Decode the image behind `uri` as RGB (fully loaded, file closed)."""
    if uri.startswith((f"{TAR_SCHEME}://", f"{HF_ROW_SCHEME}://")):
        with Image.open(io.BytesIO(read_image_bytes(uri))) as image:
            return to_rgb(image)
    with Image.open(uri) as image:
        return to_rgb(image)


def load_image_tensor(uris: list[str], size: int) -> torch.Tensor:
    """Images as float tensors in [0, 1], resized to `size` (bicubic), channels first (n, 3, size, size): the
    pixels of the captioners and the M^4I feature extractor."""
    import torch  # imported here: reading records and manifests needs no torch

    arrays = []
    for uri in uris:
        rgb = open_rgb(uri).resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(rgb, dtype=np.float32) / 255)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
