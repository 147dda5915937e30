"""One bad line never stops a source: malformed CSV rows, shards that are not tars, files too large or
outside the source's root become rejects with their reason, the rest is read, and rows in = records +
rejects for every file."""

import io
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from m4i_assets.data.manifest import RowRules, read_manifest
from m4i_assets.data.sources import load_registry
from m4i_assets.data.webdataset import read_webdataset_shard


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _accounted(out) -> dict[str, str]:
    assert out.rows_in == out.records.height + out.rejects.height
    return dict(zip(out.rejects["locator"], out.rejects["reason"]))


def test_csv_bad_rows_are_rejects_and_the_rest_is_read(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.png", (10 * i, 0, 0))
    (tmp_path / "m.csv").write_text(
        "image,caption,split\n"
        "0.png,a plain row,member\n"
        '1.png,"a caption that spans\ntwo lines",nonmember\n'
        '2.png,"an unterminated quote,member\n'
        "3.png,a row with a missing column\n"
        '3.png,"quoted, with a comma",member\n'
        "0.png,too,many,fields\n"
    )
    out = read_manifest(tmp_path / "m.csv", "csv")
    assert _accounted(out) == {"m.csv:3": "malformed_row", "m.csv:4": "malformed_row", "m.csv:6": "malformed_row"}
    assert out.records["caption"].to_list() == ["a plain row", "a caption that spans two lines", "quoted, with a comma"]
    assert out.records["split"].to_list() == ["member", "nonmember", "member"]
    details = out.rejects["detail"].to_list()
    assert "unterminated quote" in details[0] and "2 fields, the header has 3" in details[1]


def test_columns_map_fields_and_extra_columns_become_metadata(tmp_path):
    _png(tmp_path / "img" / "a.png")
    (tmp_path / "pairs.csv").write_text("filepath,title,membership\nimg/a.png,a red square,in\n")
    (tmp_path / "datasets.yaml").write_text(
        "datasets:\n  - {name: pairs, format: manifest, path: pairs.csv, columns: {image: filepath, caption: title}}\n"
    )
    (source,) = load_registry(tmp_path / "datasets.yaml")
    out = source.read("pairs.csv")
    assert out.records["caption"].to_list() == ["a red square"]
    assert out.records["metadata"].to_list() == ['{"membership": "in"}']


def test_files_are_stat_checked_and_confined_to_the_root(tmp_path):
    inside = _png(tmp_path / "root" / "ok.png")
    outside = _png(tmp_path / "elsewhere" / "x.png", (1, 2, 3))
    (tmp_path / "root" / "link.png").symlink_to(outside)
    big = tmp_path / "root" / "big.png"
    with open(big, "wb") as handle:  # sparse: 1 GB claimed, nothing written, must not be read
        handle.truncate(1 << 30)
    fifo = tmp_path / "root" / "fifo.png"
    os.mkfifo(fifo)  # reading it would block for ever
    rows = [("ok", inside), ("abs", outside), ("up", "../elsewhere/x.png"), ("link", "link.png"),
            ("big", big), ("fifo", fifo)]  # fmt: skip
    manifest = tmp_path / "root" / "m.jsonl"
    manifest.write_text("".join(f'{{"image": "{p}", "caption": "{c}"}}\n' for c, p in rows))
    out = read_manifest(manifest, "confined", RowRules(root=tmp_path / "root", max_bytes=1 << 20))
    assert _accounted(out) == {"m.jsonl:2": "outside_root", "m.jsonl:3": "outside_root", "m.jsonl:4": "outside_root",
                               "m.jsonl:5": "file_too_large", "m.jsonl:6": "not_a_file"}  # fmt: skip
    assert out.records["caption"].to_list() == ["ok"]


def test_a_file_that_is_not_a_tar_is_one_reject_naming_the_shard(tmp_path):
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, "PNG")
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as tar:
        for name, data in (("k.png", image.getvalue()), ("k.txt", b"a black square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "text.tar").write_text("this is not a tar archive at all\n" * 40)
    (tmp_path / "cut.tar").write_bytes(good.read_bytes()[:300])  # cut inside the first header
    (tmp_path / "empty.tar").write_bytes(b"")
    for name in ("text.tar", "cut.tar", "empty.tar"):
        out = read_webdataset_shard(tmp_path / name, "wds")
        assert _accounted(out) == {name: "unreadable_shard"} and out.records.height == 0
        assert name in out.rejects["detail"][0]
    assert read_webdataset_shard(good, "wds").records.height == 1


def test_registry_rules_are_validated(tmp_path):
    (tmp_path / "datasets.yaml").write_text(
        "datasets:\n  - {name: p, format: manifest, path: p.csv, columns: {picture: filepath}}\n"
    )
    with pytest.raises(ValueError, match=r"datasets\[0\].*picture"):
        load_registry(tmp_path / "datasets.yaml")
