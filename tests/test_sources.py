"""Every source format (COCO, manifests, WebDataset shards, the embedded corpus) ingests a sample built on
the fly, bad inputs included: each bad row becomes a reject with its reason, odd images are kept, and
rows in = records + rejects, per shard and in the warehouse."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import ingest
from dagster import DagsterInstance, materialize
from PIL import Image

from m4i_assets.data.coco import read_coco
from m4i_assets.data.images import open_rgb
from m4i_assets.data.manifest import RowRules
from m4i_assets.data.sources import SourceSpec, load_registry
from m4i_assets.data.webdataset import read_webdataset_shard
from m4i_assets.defs.definitions import build_resources
from m4i_assets.settings import PROFILES, AuditSettings


def _encode(mode: str, colour, size=(16, 16), fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour).save(out, fmt)
    return out.getvalue()


def zoo() -> list[tuple[str, bytes | None, str, str | None]]:
    """(file name, bytes or None for a missing file, caption, expected reject reason or None)."""
    good = _encode("RGB", (200, 30, 30))
    return [
        ("red.png", good, "a red square", None),
        ("gray.png", _encode("L", 90), "a gray square", None),
        ("cmyk.jpg", _encode("CMYK", (10, 200, 30, 0), fmt="JPEG"), "a cmyk square", None),
        ("alpha.png", _encode("RGBA", (10, 10, 200, 100)), "a translucent square", None),
        ("deep.png", _encode("I;16", 40000), "a sixteen bit square", None),
        ("missing.png", None, "nothing on disk", "missing_file"),
        ("empty.png", b"", "a zero-byte file", "empty_file"),
        ("cut.png", _encode("RGB", (1, 2, 3), size=(64, 64))[:60], "a truncated file", "undecodable_image"),
        ("html.jpg", b"<html>not a jpeg</html>", "html bytes", "undecodable_image"),
        ("bomb.png", _encode("1", 1, size=(400, 300)), "claims 120k pixels", "image_too_large"),
        ("blank.png", _encode("RGB", (0, 0, 0)), "   ", "empty_caption"),
        ("long.png", _encode("RGB", (0, 0, 1)), "word " * 300, "overlong_caption"),
        ("red_again.png", good, "a red square", "duplicate"),  # same bytes, same caption as red.png
    ]


MAX_PIXELS = 100_000  # so the 400 x 300 "bomb" stays a small file
RULES = RowRules(max_pixels=MAX_PIXELS)


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data, _, _ in zoo():
        if data is not None:
            (folder / name).write_bytes(data)


def _coco(root: Path) -> Path:
    _write_images(root / "images")
    images = [{"id": i + 1, "file_name": name} for i, (name, *_) in enumerate(zoo())]
    annotations = [{"id": 100 + i, "image_id": i + 1, "caption": cap} for i, (_, _, cap, _) in enumerate(zoo())]
    annotations.append({"id": 999, "image_id": 12345, "caption": "no such image"})  # malformed row
    images.append({"id": 77})  # image entry without a file name: malformed row
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def _expected(extra: dict[str, int]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for *_, reason in zoo():
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in extra.items():
        reasons[reason] = reasons.get(reason, 0) + n
    return reasons


def _reasons(rejects: pl.DataFrame) -> dict[str, int]:
    return dict(rejects.group_by("reason").len().iter_rows())


def test_coco_source_keeps_odd_images_and_rejects_bad_rows(tmp_path):
    annotations = _coco(tmp_path)
    out = read_coco(annotations, tmp_path / "images", "coco", rules=RULES)
    assert out.rows_in == len(zoo()) + 2 == out.records.height + out.rejects.height
    assert sorted(out.records["caption"]) == sorted(c for _, _, c, r in zoo() if r is None)
    assert _reasons(out.rejects) == _expected({"malformed_row": 2})
    assert {json.loads(m)["image_id"] for m in out.records["metadata"]} == {1, 2, 3, 4, 5}
    # Shards split the images; together they hold every row exactly once.
    parts = [read_coco(annotations, tmp_path / "images", "coco", k, 3, RULES) for k in range(3)]
    assert sum(p.rows_in for p in parts) == out.rows_in
    ids = [i for p in parts for i in p.records["record_id"]]
    # red.png and its duplicate land in different shards: each shard keeps its copy, `records` merges them.
    assert set(ids) == set(out.records["record_id"]) and len(ids) == out.records.height + 1


def test_coco_file_that_is_not_coco_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"images": [], "annotations": [{"caption": "caf\xe9"}]}')
    with pytest.raises(ValueError, match="latin1.json is not JSON"):
        read_coco(bad, tmp_path / "images", "coco")
    other = tmp_path / "other.json"
    other.write_text('{"categories": []}')
    with pytest.raises(ValueError, match="other.json is not a COCO captions file"):
        read_coco(other, tmp_path / "images", "coco")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_coco(tmp_path / "nope.json", tmp_path / "images", "coco")


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A plain tar; a member with None data is a symbolic link (not readable data)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere.jpg"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _wds_members(entries, start: int = 0) -> list[tuple[str, bytes | None]]:
    members = []
    for i, (name, data, caption, _) in enumerate(entries, start):
        key = f"{i:09d}"
        ext = name.rsplit(".", 1)[1]
        if data is not None:  # a key without an image member
            members.append((f"{key}.{ext}", data))
        members.append((f"{key}.txt", caption.encode()))
        members.append((f"{key}.json", json.dumps({"key": key, "source_name": name}).encode()))
    return members


def test_webdataset_shard_streams_keys_and_rejects_unreadable_members(tmp_path):
    entries = zoo()
    members = _wds_members(entries)
    members += [("000000100.jpg", None), ("000000100.txt", b"a link, not an image")]  # unreadable member
    members += [("000000101.png", _encode("RGB", (5, 5, 5))), ("000000101.txt", b"caf\xe9 latin-1")]  # not UTF-8
    members += [("000000102.png", _encode("RGB", (6, 6, 6))), ("000000102.json", b'{"caption": "from json"}')]
    (tmp_path / "my shards%20").mkdir()  # a path the URI must quote, and its reader unquote
    shard = _tar(tmp_path / "my shards%20" / "00000.tar", members)
    out = read_webdataset_shard(shard, "wds", RULES)
    # A missing file in a shard is a key without an image member: malformed, not missing_file.
    expected = _expected({"unreadable_tar_member": 1, "not_utf8": 1, "malformed_row": 1})
    expected.pop("missing_file")
    assert out.rows_in == len(entries) + 3 == out.records.height + out.rejects.height
    assert _reasons(out.rejects) == expected
    assert "from json" in out.records["caption"].to_list()  # img2dataset's json carries the caption too
    deep = out.records.filter(pl.col("caption") == "a sixteen bit square")["image_uri"][0]
    assert deep.startswith("tar://") and np.asarray(open_rgb(deep))[0, 0].tolist() == [156, 156, 156]


def test_webdataset_members_over_max_bytes_are_never_read(tmp_path, monkeypatch):
    """A member larger than `max_bytes` is a `file_too_large` reject whose data the reader never holds (its key's
    neighbours are records), whatever the member's size: the image, or a caption file."""
    small, big = _encode("RGB", (1, 2, 3), size=(4, 4)), _encode("RGB", (9, 9, 9), size=(64, 64), fmt="BMP")
    shard = _tar(
        tmp_path / "00000.tar",
        [
            ("a.png", small),
            ("a.txt", b"a small one"),
            ("b.bmp", big),
            ("b.txt", b"a big one"),
            ("c.png", _encode("RGB", (4, 5, 6), size=(4, 4))),
            ("c.txt", b"x" * 1000),
        ],
    )
    read_sizes = []
    original = tarfile.ExFileObject.read

    def counting_read(self, *args):
        data = original(self, *args)
        read_sizes.append(len(data))
        return data

    monkeypatch.setattr(tarfile.ExFileObject, "read", counting_read)
    limit = 500
    out = read_webdataset_shard(shard, "wds", RowRules(max_pixels=MAX_PIXELS, max_bytes=limit))
    assert out.rows_in == 3 and out.records["caption"].to_list() == ["a small one"]
    assert _reasons(out.rejects) == {"file_too_large": 2}
    assert all("bytes > 500" in d for d in out.rejects["detail"]) and len(big) > limit
    assert max(read_sizes) <= limit  # the large members were skipped in the stream, not read and dropped


def test_truncated_and_compressed_shards(tmp_path):
    shard = _tar(tmp_path / "full.tar", _wds_members(zoo()[:3]))
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 512 * 7 + 20])  # ends inside the second key's image (its data starts at 3584)
    out = read_webdataset_shard(cut, "wds", RULES)
    assert out.rows_in == out.records.height + out.rejects.height and out.records.height == 1
    assert set(out.rejects["reason"]) == {"unreadable_tar_member"}
    gz = tmp_path / "z.tar"
    gz.write_bytes(b"\x1f\x8b" + data[:100])
    with pytest.raises(ValueError, match="z.tar is gzip-compressed"):
        read_webdataset_shard(gz, "wds")


def test_registry_errors_name_the_file(tmp_path):
    registry = tmp_path / "datasets.yaml"
    assert load_registry(registry) == []  # no registry: no user sources
    for text, message in [
        ("datasets: [", "not valid YAML"),
        ("datasets: [{name: a, format: tiff, path: x}]", "unknown format 'tiff'"),
        ("datasets: [{name: a, format: coco, path: x.json}]", "needs 'images'"),
        ("datasets: [{name: a, format: manifest, path: x, colour: red}]", "unknown keys \\['colour'\\]"),
        ("datasets: [{name: a, format: manifest, path: x}, {name: a, format: manifest, path: y}]", "unique"),
        ("datasets: [{format: manifest, path: x}]", "needs name, format and path"),
        # field types and ranges, before anything is read
        ("datasets: [{name: a, format: manifest, path: x, max_bytes: -5}]", "max_bytes must be a positive integer"),
        ("datasets: [{name: a, format: manifest, path: x, max_pixels: lots}]", "max_pixels must be a positive int"),
        ("datasets: [{name: a, format: manifest, path: x, root: 42}]", "root must be a string, not 42"),
        ("datasets: [{name: a, format: coco, path: x, images: [a]}]", "images must be a string"),
        ("datasets: [{name: a, format: manifest, path: x, shards: 0}]", "shards must be a positive integer"),
    ]:
        registry.write_text(text)
        with pytest.raises(ValueError, match=message) as info:
            load_registry(registry)
        assert str(registry) in str(info.value)
    registry.write_text("datasets: [{name: a, format: webdataset, path: shards/}]")
    (source,) = load_registry(registry)
    assert source.path == str(tmp_path / "shards")  # relative to the registry file
    with pytest.raises(FileNotFoundError, match="matches no file"):
        source.shard_ids()


def test_every_format_ingests_through_the_assets_idempotently(tmp_path):
    """COCO in two shards, a Parquet manifest, two WebDataset shards (with a record repeated across them),
    and the embedded corpus, through `source_shards` and `records`; roles drawn from a registered source."""
    data = tmp_path / "data"
    annotations = _coco(data / "coco")
    _write_images(data / "pairs")
    pl.DataFrame(
        {"image": [n for n, *_ in zoo()], "caption": [c for _, _, c, _ in zoo()], "split": "train"}
    ).write_parquet(data / "pairs" / "manifest.parquet")
    good = [e for e in zoo() if e[3] is None]
    (data / "wds").mkdir()
    _tar(data / "wds" / "00000.tar", _wds_members(zoo()))
    _tar(data / "wds" / "00001.tar", _wds_members(good[:2] + [("x.png", _encode("RGB", (9, 9, 9)), "new", None)]))
    registry = data / "datasets.yaml"
    registry.write_text(
        f"""datasets:
  - {{name: coco, format: coco, path: {annotations.relative_to(data)}, images: coco/images, shards: 2,
      max_pixels: {MAX_PIXELS}}}
  - {{name: pairs, format: manifest, path: pairs/manifest.parquet, max_pixels: {MAX_PIXELS}}}
  - {{name: wds, format: webdataset, path: wds/*.tar, max_pixels: {MAX_PIXELS}}}
"""
    )
    settings = AuditSettings(**{**PROFILES["tiny"], "audit": "sources", "dataset_registry": str(registry),
                                "second_domain_records": 0, "audit_dataset": "wds", "n_members": 1,
                                "n_nonmembers": 1, "n_known_nonmembers": 1})  # fmt: skip
    resources = build_resources(home=tmp_path / "home", settings=settings)
    instance = DagsterInstance.ephemeral()
    assets = ingest(resources, instance)
    storage = resources["storage"]

    def tables():
        recs = storage.read("SELECT dataset, record_id, image_uri FROM records ORDER BY ALL")
        rejects = storage.read("SELECT source, locator, reason FROM rejects ORDER BY ALL")
        return recs, rejects

    recs, rejects = tables()
    per = dict(recs.group_by("dataset").len().iter_rows())
    assert per == {"coco": 5, "pairs": 5, "wds": 6, "synthetic_shapes": PROFILES["tiny"]["corpus_records"]}
    wds_rejects = rejects.filter(pl.col("source") == "wds")
    # The second shard repeats two records of the first: duplicates, named after the first shard's row.
    assert wds_rejects.filter(pl.col("locator").str.starts_with("00001.tar"))["reason"].to_list() == ["duplicate"] * 2
    rows_in = {"coco": len(zoo()) + 2, "pairs": len(zoo()), "wds": len(zoo()) + 3}
    for name, n in rows_in.items():
        assert per[name] + rejects.filter(pl.col("source") == name).height == n
    roles = storage.read("SELECT record_id, role FROM record_roles WHERE audit = 'sources' ORDER BY ALL")
    assert sorted(roles["record_id"]) == sorted(recs.filter(pl.col("dataset") == "wds")["record_id"])
    assert all(open_rgb(u).size == (16, 16) for u in recs.filter(pl.col("dataset") != "synthetic_shapes")["image_uri"])

    # Re-ingesting the same sources changes nothing (content-hash ids, deterministic duplicate order).
    again = materialize(assets, resources=resources, instance=instance, selection=["source_shards"],
                        partition_key="wds/00001.tar")  # fmt: skip
    assert again.success
    merged = materialize(assets, resources=resources, instance=instance, selection=["records"])
    (check,) = merged.get_asset_check_evaluations()
    assert check.check_name == "rows_accounted_for" and check.passed
    assert check.metadata["rows_in"].value == sum(rows_in.values()) + PROFILES["tiny"]["corpus_records"]
    assert all(a.equals(b) for a, b in zip(tables(), (recs, rejects)))


def test_sources_validate_their_fields():
    with pytest.raises(ValueError, match="unknown format"):
        SourceSpec("a", "zip", "x")
    with pytest.raises(ValueError, match="without '/'"):
        SourceSpec("a/b", "manifest", "x")
