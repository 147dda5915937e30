"""WebDataset tar shards in img2dataset's layout: per key `<key>.jpg` (or png/webp), `<key>.txt` (the
caption) and `<key>.json` (metadata), the members of one key next to each other.

A shard is streamed member by member (never extracted, never held in memory beyond one key), and each
key becomes one row for `manifest.ingest_rows`. The image stays inside the shard: its `image_uri` is the
member's byte range (`images.tar_member_uri`), so shards must be uncompressed `.tar` files, as
img2dataset writes them. A member that cannot be read (truncated shard, link instead of data) makes its
key a reject (`unreadable_tar_member`); a corrupt header ends the shard with one reject for the rest; a
file that is not a tar at all (or is cut inside its first header) is one `unreadable_shard` reject naming
the shard. A member larger than the source's `max_bytes` (by its tar header) is never read and its key is a
`file_too_large` reject: a worker holds at most `max_bytes` of any member, whatever the shard holds. A
registry's `columns: {caption: <key>}` names the `<key>.json` field a caption is read from when there is no
`<key>.txt`.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from m4i_assets.data.images import tar_member_uri
from m4i_assets.data.manifest import DEFAULT_RULES, Ingested, RowRules, ingest_rows

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def _split(name: str) -> tuple[str, str]:
    """(key, extension) of a member: WebDataset's key is the path up to the first dot of the basename."""
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    return str(path.parent / stem) if str(path.parent) != "." else stem, ext.lower()


def _row(shard: Path, members: dict[str, tuple[tarfile.TarInfo, bytes | str | None]], caption_key: str) -> dict:
    """One key's members (extension -> (info, bytes, an error message, or None: larger than `max_bytes`, not
    read)) as a row for `check_row`."""
    errors = [f"{info.name}: {data}" for info, data in members.values() if isinstance(data, str)]
    if errors:
        return {"__unreadable__": "; ".join(errors)}
    too_large = [f"{info.name}: {info.size} bytes" for info, data in members.values() if data is None]
    if too_large:
        return {"__too_large__": "; ".join(too_large)}
    images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
    if not images:
        return {"__malformed__": f"no image member (found {', '.join(sorted(members))})"}
    info, image = members[images[0]]
    uri = tar_member_uri(shard, info.name, info.offset_data, info.size)
    row: dict = {"__image_bytes__": image, "__image_uri__": uri}
    metadata = None
    if "json" in members:
        try:
            metadata = json.loads(members["json"][1])
        except (ValueError, UnicodeDecodeError) as exc:
            metadata = {"json_error": str(exc)}
    if "txt" in members:
        try:
            row["caption"] = members["txt"][1].decode("utf-8")
        except UnicodeDecodeError as exc:
            return {"__not_utf8__": f"{members['txt'][0].name}: byte {exc.start} is not UTF-8"}
    elif isinstance(metadata, dict) and isinstance(metadata.get(caption_key), str):
        row["caption"] = metadata[caption_key]
    row["metadata"] = metadata
    return row


def shard_rows(shard: Path, caption_key: str = "caption", max_bytes: int | None = None) -> Iterator[tuple[str, dict]]:
    """(locator, row) per key of one tar shard, streamed; a member larger than `max_bytes` (its header says) is
    skipped unread, and its key is a `file_too_large` reject."""
    if not shard.is_file():
        raise FileNotFoundError(f"WebDataset shard not found: {shard}")
    with open(shard, "rb") as handle:
        if handle.read(2) == b"\x1f\x8b":
            raise ValueError(f"{shard} is gzip-compressed; shards must be plain .tar files (as img2dataset writes)")
    key, members = None, {}
    with open(shard, "rb") as handle:
        try:
            tar = tarfile.open(fileobj=handle, mode="r|")
        except tarfile.TarError as exc:  # not a tar, or cut inside its first header: one reject for the shard
            yield shard.name, {"__unreadable_shard__": f"{shard} is not a readable tar: {exc}"}
            return
        try:
            for info in tar:
                if info.isdir():
                    continue
                member_key, ext = _split(info.name)
                if member_key != key and members:
                    yield f"{shard.name}:{key}", _row(shard, members, caption_key)
                    members = {}
                key = member_key
                if not info.isfile():
                    members[ext] = (info, "a link or special file, not data")
                    continue
                if max_bytes is not None and info.size > max_bytes:
                    members[ext] = (info, None)  # the stream skips its data unread
                    continue
                try:
                    members[ext] = (info, tar.extractfile(info).read())
                except (tarfile.TarError, OSError) as exc:
                    members[ext] = (info, f"unreadable: {exc}")
        except tarfile.TarError as exc:
            if members:
                yield f"{shard.name}:{key}", _row(shard, members, caption_key)
                members = {}
            yield f"{shard.name}:@{handle.tell()}", {"__unreadable__": f"the rest of the shard is unreadable: {exc}"}
        tar.close()
    if members:
        yield f"{shard.name}:{key}", _row(shard, members, caption_key)


def read_webdataset_shard(shard: str | os.PathLike, dataset: str, rules: RowRules = DEFAULT_RULES) -> Ingested:
    """Records and rejects of one tar shard (rows in = keys = records + rejects)."""
    rows = shard_rows(Path(shard), rules.columns.get("caption", "caption"), rules.max_bytes)
    return ingest_rows(rows, dataset, None, RowRules(rules.max_pixels, rules.max_bytes, rules.root))
