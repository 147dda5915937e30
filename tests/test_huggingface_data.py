"""The `huggingface` source format: datasets built with the `datasets` library itself (`to_parquet`,
`save_to_disk`) and raw Parquet / Arrow files, bad rows included. Every row is a record or a reject, images
decode from their row URI to the original pixels without being extracted, ids do not depend on the file form,
and a `split` column (or any other column) is an audit's role column."""

import io
import json

import datasets
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ingest
from dagster import DagsterInstance
from PIL import Image

from m4i_assets.data import images
from m4i_assets.data.audits import load_audits, role_column, roles_from_data
from m4i_assets.data.images import open_rgb, read_image_bytes
from m4i_assets.data.sources import SourceSpec, load_registry
from m4i_assets.defs.definitions import build_resources
from m4i_assets.settings import PROFILES, AuditSettings

datasets.disable_progress_bars()
ROLES = ("member", "nonmember", "known_nonmember")
N_GOOD = 36


def _pixels(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def hf_dataset() -> tuple[datasets.Dataset, dict[str, int]]:
    """N_GOOD noise images with unique captions, a role in `split`, a ClassLabel and a URL; then a duplicate of
    row 0 (row 1), garbage bytes, an empty and a blank caption and a row without an image. Returns the dataset
    and the reject reasons it must give."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "split": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["cat", "dog"]),
            "url": datasets.Value("string"),
        }
    )
    rows = [(Image.fromarray(_pixels(i)), f"noise picture number {i}", ROLES[i % 3], i % 2) for i in range(N_GOOD)]
    rows.insert(1, rows[0])  # same bytes, same caption: `duplicate`
    rows += [
        ({"bytes": b"\x89PNG not really", "path": None}, "garbage bytes", "member", 0),  # undecodable_image
        (Image.fromarray(_pixels(100)), "", "member", 0),  # empty_caption
        (Image.fromarray(_pixels(101)), "   ", "member", 0),  # empty_caption
        (None, "a row without an image", "member", 0),  # malformed_row
    ]
    columns = {
        "image": [r[0] for r in rows],
        "text": [r[1] for r in rows],
        "split": [r[2] for r in rows],
        "label": [r[3] for r in rows],
        "url": [f"https://example.org/{i}.png" for i in range(len(rows))],
    }
    expected = {"duplicate": 1, "undecodable_image": 1, "empty_caption": 2, "malformed_row": 1}
    return datasets.Dataset.from_dict(columns, features=features), expected


def _read_all(source: SourceSpec) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    parts = [source.read(shard) for shard in source.shard_ids()]
    records = pl.concat([p.records for p in parts])
    rejects = pl.concat([p.rejects for p in parts])
    return records, rejects, sum(p.rows_in for p in parts)


def _reasons(rejects: pl.DataFrame) -> dict[str, int]:
    return dict(rejects.group_by("reason").len().iter_rows())


def test_parquet_and_save_to_disk_give_the_same_records(tmp_path):
    dataset, expected = hf_dataset()
    dataset.to_parquet(tmp_path / "train.parquet", batch_size=10)  # several row groups
    dataset.save_to_disk(tmp_path / "saved", num_shards=2)
    assert pq.ParquetFile(tmp_path / "train.parquet").num_row_groups > 1
    parquet = SourceSpec("hub", "huggingface", str(tmp_path / "train.parquet"))
    saved = SourceSpec("hub", "huggingface", str(tmp_path / "saved"))
    assert parquet.shard_ids() == ["train.parquet"]
    assert saved.shard_ids() == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    outputs = {}
    for source in (parquet, saved):
        records, rejects, rows_in = _read_all(source)
        assert rows_in == len(dataset) == records.height + rejects.height
        assert records.height == N_GOOD and _reasons(rejects) == expected
        outputs[source.path] = records, rejects
        for row in records.iter_rows(named=True):
            assert row["image_uri"].startswith("hfrow:///") and "column=image" in row["image_uri"]
            i = int(row["caption"].rsplit(" ", 1)[1])
            assert np.array_equal(np.asarray(open_rgb(row["image_uri"])), _pixels(i))
            assert row["split"] == ROLES[i % 3]  # the `split` column is records.split, as in a CSV manifest
            url = f"https://example.org/{i + (i > 0)}.png"  # row 1 is the inserted duplicate
            assert json.loads(row["metadata"]) == {"label": ["cat", "dog"][i % 2], "url": url}  # the other columns
    (p_records, p_rejects), (s_records, s_rejects) = outputs.values()
    assert p_records["record_id"].sort().equals(s_records["record_id"].sort())  # bytes + caption: the form is moot
    assert sorted(p_records["caption"]) == sorted(s_records["caption"])
    # Locators are <file>:<row>, 0-based as in the URI: the same rows are rejected in both forms.
    assert p_rejects.sort("locator")["reason"].to_list() == s_rejects.sort("locator")["reason"].to_list()
    assert p_rejects.filter(pl.col("reason") == "duplicate")["locator"].to_list() == ["train.parquet:1"]
    assert read_image_bytes(p_records["image_uri"][0]) == read_image_bytes(s_records["image_uri"][0])


def test_a_registry_maps_columns_and_a_column_is_a_role(tmp_path):
    """`columns` renames the image, caption and split columns; `split` and any metadata column are audit roles."""
    dataset, _ = hf_dataset()
    dataset = dataset.rename_columns({"image": "picture", "text": "title", "split": "part"})
    (tmp_path / "hub").mkdir()
    dataset.to_parquet(tmp_path / "hub" / "train-00000.parquet")
    dataset.save_to_disk(tmp_path / "saved")
    (tmp_path / "datasets.yaml").write_text("""datasets:
  - {name: hub, format: huggingface, path: hub/*.parquet, columns: {image: picture, caption: title, split: part}}
  - {name: saved, format: huggingface, path: saved, columns: {image: picture, caption: title, split: part}}
  - {name: folder, format: huggingface, path: hub}
""")
    hub, saved, folder = load_registry(tmp_path / "datasets.yaml")
    assert folder.shard_ids() == hub.shard_ids() == ["train-00000.parquet"]  # a folder of *.parquet
    records, rejects, rows_in = _read_all(hub)
    assert records.height == N_GOOD and rows_in == records.height + rejects.height
    assert _read_all(saved)[0]["record_id"].sort().equals(records["record_id"].sort())
    assert role_column(records, "split").value_counts().sort("split").rows() == [(r, 12) for r in sorted(ROLES)]
    assert set(role_column(records, "label")) == {"cat", "dog"}  # a ClassLabel keeps its names
    # Without the mapping there is no `image` column and no caption: every row is rejected, none is lost.
    bare, bare_rejects, bare_in = _read_all(folder)
    assert bare.height == 0 and bare_rejects.height == bare_in == len(dataset)
    (tmp_path / "audits.yaml").write_text("""audits:
  - {name: hub-audit, family: clip, dataset: hub, targets: [m],
     roles: {column: split, member: member, nonmember: nonmember, known_nonmember: known_nonmember}}
  - {name: by-label, family: clip, dataset: hub, targets: [m], roles: {column: label, member: cat, nonmember: dog}}
""")
    by_split, by_label = load_audits(tmp_path / "audits.yaml")
    roles = roles_from_data(records, by_split, seed=0)
    assert dict(roles.group_by("role").len().rows()) == {r: 12 for r in ROLES}
    roles = roles_from_data(records, by_label, seed=0)
    assert dict(roles.group_by("role").len().rows()) == {"member": 18, "nonmember": 18}


def _struct_table(cells: list[dict | None], captions: list[str]) -> pa.Table:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table({"image": pa.array(cells, type=image), "caption": pa.array(captions)})


def test_plain_bytes_file_paths_limits_and_files_that_are_not_datasets(tmp_path):
    """An image column of plain bytes; struct cells with no bytes but a path (read from the file, or
    `missing_file`); `max_bytes` and `max_pixels` on the stored bytes; a file that is not Parquet at all."""
    folder = tmp_path / "hub"
    folder.mkdir()
    small, big = _png(_pixels(1)), _png(np.zeros((400, 300, 3), np.uint8))  # big: 120k pixels
    huge = _png(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))  # > 12 kB
    pq.write_table(
        pa.table({"image": [small, big, huge, b"garbage"], "caption": ["a", "b", "c", "d"]}),
        folder / "a-binary.parquet",
    )
    (folder / "pictures").mkdir()
    (folder / "pictures" / "on-disk.png").write_bytes(_png(_pixels(2)))
    cells = [
        {"bytes": None, "path": "pictures/on-disk.png"},
        {"bytes": None, "path": "pictures/none.png"},
        {"bytes": _png(_pixels(3)), "path": "ignored.png"},
    ]
    pq.write_table(_struct_table(cells, ["on disk", "missing", "stored"]), folder / "b-paths.parquet")
    (folder / "c-junk.parquet").write_text("this is not a parquet file\n")
    source = SourceSpec("hub", "huggingface", str(folder / "*.parquet"), max_pixels=100_000, max_bytes=12_000)
    assert source.shard_ids() == ["a-binary.parquet", "b-paths.parquet", "c-junk.parquet"]
    binary = source.read("a-binary.parquet")
    assert binary.rows_in == 4 and binary.records["caption"].to_list() == ["a"]
    assert dict(zip(binary.rejects["locator"], binary.rejects["reason"])) == {
        "a-binary.parquet:1": "image_too_large",
        "a-binary.parquet:2": "file_too_large",
        "a-binary.parquet:3": "undecodable_image",
    }
    assert np.array_equal(np.asarray(open_rgb(binary.records["image_uri"][0])), _pixels(1))
    paths = source.read("b-paths.parquet")
    assert paths.rows_in == 3 and paths.records["caption"].to_list() == ["on disk", "stored"]
    assert paths.rejects.select("locator", "reason").rows() == [("b-paths.parquet:1", "missing_file")]
    on_disk, stored = paths.records["image_uri"]
    assert on_disk == str((folder / "pictures" / "on-disk.png").resolve())  # an image file, read as a manifest's
    assert np.array_equal(np.asarray(open_rgb(on_disk)), _pixels(2))
    assert np.array_equal(np.asarray(open_rgb(stored)), _pixels(3))
    junk = source.read("c-junk.parquet")
    assert junk.rows_in == 1 and junk.records.height == 0
    (reject,) = junk.rejects.to_dicts()
    assert reject["reason"] == "unreadable_shard" and "c-junk.parquet" in reject["detail"]


def test_a_truncated_arrow_file_keeps_its_readable_rows(tmp_path):
    """A save_to_disk stream cut short: the record batches before the cut are ingested and still open, the
    rest is one `unreadable_shard` reject."""
    dataset, _ = hf_dataset()
    dataset.save_to_disk(tmp_path / "saved")
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    table = dataset.data.table  # rewritten in record batches of 8 rows (datasets writes 41 rows in one)
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=8):
            writer.write_batch(batch)
    data = arrow.read_bytes()
    arrow.write_bytes(data[: int(len(data) * 0.6)])
    out = SourceSpec("saved", "huggingface", str(tmp_path / "saved")).read(arrow.name)
    read = out.rows_in - 1  # whole record batches of 8 rows, then one reject for the rest
    assert read >= 16 and read % 8 == 0 and out.records.height == read - 1  # row 1 is a duplicate
    assert out.rejects.select("locator", "reason").rows() == [
        (f"{arrow.name}:1", "duplicate"),
        (f"{arrow.name}:{read}", "unreadable_shard"),
    ]
    assert "the rest of the file" in out.rejects["detail"][1]
    assert all(open_rgb(u).size == (16, 16) for u in out.records["image_uri"])
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ValueError, match="DatasetDict folder: name one split's folder"):
        SourceSpec("d", "huggingface", str(tmp_path / "dict")).shard_ids()
    with pytest.raises(FileNotFoundError, match="matches no file"):
        SourceSpec("e", "huggingface", str(tmp_path / "nothing-*.parquet")).shard_ids()


def test_reading_a_batch_of_rows_reads_each_row_group_once(tmp_path):
    dataset, _ = hf_dataset()
    dataset.to_parquet(tmp_path / "train.parquet", batch_size=10)
    records = SourceSpec("hub", "huggingface", str(tmp_path / "train.parquet")).read("train.parquet").records
    images._parquet_group.cache_clear()
    uris = records["image_uri"].to_list()[:20]  # rows 0 and 2..20: row groups 0, 1 and 2
    assert [np.asarray(open_rgb(u)).shape for u in uris] == [(16, 16, 3)] * 20
    info = images._parquet_group.cache_info()
    assert info.misses == 3 and info.hits == 17 and info.currsize <= images.HF_CACHE_ENTRIES


def test_a_huggingface_source_feeds_an_audit_of_the_registry(tmp_path):
    """Through the assets: `source_shards` per Arrow file, `records`, and `record_roles` from the split column."""
    dataset, expected = hf_dataset()
    dataset.save_to_disk(tmp_path / "data" / "hub", num_shards=2)
    (tmp_path / "datasets.yaml").write_text(
        f"datasets:\n  - {{name: hub, format: huggingface, path: {tmp_path}/data/hub}}\n"
    )
    (tmp_path / "audits.yaml").write_text("""audits:
  - name: hub-audit
    family: clip
    dataset: hub
    roles: {column: split, member: member, nonmember: nonmember, known_nonmember: known_nonmember}
    targets: [models/none]
""")
    settings = AuditSettings(**{**PROFILES["tiny"], "audit": "hub-audit"})
    resources = build_resources(home=tmp_path, settings=settings)
    ingest(resources, DagsterInstance.ephemeral())
    storage = resources["storage"]
    assert storage.read("SELECT count(*) AS n FROM records WHERE dataset = 'hub'")["n"][0] == N_GOOD
    rejects = storage.read("SELECT reason, count(*) AS n FROM rejects WHERE source = 'hub' GROUP BY reason")
    assert dict(rejects.rows()) == expected
    roles = storage.read("SELECT role, count(*) AS n FROM record_roles WHERE audit = 'hub-audit' GROUP BY role")
    assert dict(roles.rows()) == {r: 12 for r in ROLES}
    uris = storage.read("SELECT image_uri FROM records WHERE dataset = 'hub'")["image_uri"]
    assert all(u.startswith("hfrow:///") and open_rgb(u).size == (16, 16) for u in uris)
