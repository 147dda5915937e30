"""COCO captions: an annotations JSON (`images`, `annotations`) plus an image folder, as records.

One record per caption annotation (COCO has about five per image), each naming its image file under
the image folder; the rows then go through the same checks as a manifest's (`manifest.ingest_rows`).
A large annotation file is read in `n_shards` shards by image: shard k holds the images whose position,
in image-id order, is k modulo `n_shards`, with all their captions.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from m4i_assets.data.manifest import DEFAULT_RULES, Ingested, RowRules, ingest_rows


def _load(annotations: Path) -> tuple[list[dict], list[dict]]:
    """The `images` and `annotations` lists; a clear error naming the file when it is not COCO captions."""
    if not annotations.is_file():
        raise FileNotFoundError(f"COCO annotations not found: {annotations}")
    try:
        data = json.loads(annotations.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{annotations} is not JSON: {exc}") from exc
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise ValueError(f"{annotations} is not a COCO captions file (needs 'images' and 'annotations' lists)")
    return data["images"], data["annotations"]


def coco_rows(annotations: Path, shard: int = 0, n_shards: int = 1) -> Iterator[tuple[str, dict]]:
    """(locator, row) for every caption annotation of shard `shard`; a malformed image entry or annotation
    is a row marked malformed (annotations of unknown images belong to shard 0)."""
    images, annots = _load(annotations)
    name = annotations.name
    by_image: dict = defaultdict(list)
    for i, ann in enumerate(annots):
        key = ann.get("image_id") if isinstance(ann, dict) else None
        key = key if isinstance(key, int | str) else None
        by_image[key].append((i, ann))
    valid, bad = {}, []
    for i, im in enumerate(images):
        if not (isinstance(im, dict) and isinstance(im.get("id"), int | str) and isinstance(im.get("file_name"), str)):
            bad.append((i, "image entry without 'id' and 'file_name'"))
        elif im["id"] in valid:
            bad.append((i, f"image id {im['id']!r} listed twice"))
        else:
            valid[im["id"]] = im
    if shard == 0:
        for i, why in bad:
            yield f"{name}:images[{i}]", {"__malformed__": why}
        for key in sorted((k for k in by_image if k not in valid), key=str):
            for i, _ in by_image[key]:
                yield f"{name}:annotations[{i}]", {"__malformed__": f"annotation of unknown image_id {key!r}"}
    for position, im in enumerate(sorted(valid.values(), key=lambda im: str(im["id"]))):
        if position % n_shards != shard:
            continue
        for i, ann in by_image.get(im["id"], []):
            row = {"image": im["file_name"], "caption": ann.get("caption"),
                   "metadata": {"image_id": im["id"], "annotation_id": ann.get("id")}}  # fmt: skip
            yield f"{name}:annotation={ann.get('id', i)}", row


def read_coco(
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    dataset: str,
    shard: int = 0,
    n_shards: int = 1,
    rules: RowRules = DEFAULT_RULES,
) -> Ingested:
    """Records and rejects of one shard of a COCO captions source (rows in = records + rejects)."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range for {n_shards} shards")
    folder = Path(images)
    if not folder.is_dir():
        raise FileNotFoundError(f"COCO image folder not found: {folder}")
    return ingest_rows(coco_rows(Path(annotations), shard, n_shards), dataset, folder, rules)
