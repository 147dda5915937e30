import json

import pytest

from m4i_assets.data.corpus import CorpusSpec, generate
from m4i_assets.data.manifest import RowRules, read_manifest, record_id
from m4i_assets.data.roles import RoleSpec, assign_roles


def test_manifest_reader_ingests_the_corpus_with_stable_ids(tmp_path):
    manifest = generate(CorpusSpec(n_records=30, image_size=32), tmp_path)
    first = read_manifest(manifest, "synthetic")
    again = read_manifest(manifest, "synthetic")
    assert first.rows_in == 30 == first.records.height and first.rejects.height == 0
    assert first.records["record_id"].to_list() == again.records["record_id"].to_list()
    assert first.records["record_id"].n_unique() == 30


def test_unusable_rows_become_rejects_and_nothing_is_lost(tmp_path):
    manifest = generate(CorpusSpec(n_records=3, image_size=32), tmp_path)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    bad = [
        {"image": "images/nope.png", "caption": "missing"},
        {"image": "empty.png", "caption": "empty file"},
        {"image": "text.png", "caption": "not an image"},
        {"image": rows[0]["image"], "caption": "   "},
        {"caption": "no image field"},
        rows[1],  # exact duplicate of a usable row
    ]
    lines = [json.dumps(r) for r in rows + bad] + ["{this is not json"]
    manifest.write_text("\n".join(lines) + "\n")
    out = read_manifest(manifest, "mixed")
    assert out.rows_in == len(lines) == out.records.height + out.rejects.height
    assert out.records.height == 3
    assert sorted(out.rejects["reason"].to_list()) == sorted(
        [
            "missing_file",
            "empty_file",
            "undecodable_image",
            "empty_caption",
            "malformed_row",
            "duplicate",
            "malformed_row",
        ]
    )


def test_record_id_depends_on_bytes_and_caption():
    assert record_id(b"x", "a") != record_id(b"x", "b") != record_id(b"y", "b")
    assert len(record_id(b"x", "a")) == 16


def test_roles_are_disjoint_seeded_and_sized():
    ids = [f"r{i:04d}" for i in range(100)]
    spec = RoleSpec(n_members=20, n_nonmembers=20, n_known_nonmembers=10, seed=3)
    roles = assign_roles(ids, spec)
    counts = dict(roles.group_by("role").len().iter_rows())
    assert counts == {"member": 20, "nonmember": 20, "known_nonmember": 10, "population": 50}
    assert roles["record_id"].n_unique() == 100
    assert (roles["is_member"] == (roles["role"] == "member")).all()
    assert roles.equals(assign_roles(list(reversed(ids)), spec))  # input order does not matter
    assert not roles.equals(assign_roles(ids, RoleSpec(20, 20, 10, seed=4)))


def test_roles_need_a_population():
    with pytest.raises(ValueError, match="only 10 records"):
        assign_roles([str(i) for i in range(10)], RoleSpec(5, 5, 0))


def test_roles_can_draw_nonmembers_from_a_shifted_pool():
    ids = [f"r{i:04d}" for i in range(60)]
    shifted = [f"s{i:04d}" for i in range(30)]
    roles = assign_roles(ids, RoleSpec(n_members=10, n_nonmembers=20, n_known_nonmembers=10, seed=1), shifted)
    nonmembers = roles.filter(roles["role"] == "nonmember")["record_id"].to_list()
    assert len(nonmembers) == 20 and all(r.startswith("s") for r in nonmembers)
    counts = dict(roles.group_by("role").len().iter_rows())
    assert counts == {"member": 10, "nonmember": 20, "known_nonmember": 10, "population": 40}
    with pytest.raises(ValueError, match="shifted pool has 30"):
        assign_roles(ids, RoleSpec(10, 40, 10), shifted)


def _png(path, mode: str, size=(24, 24), fmt: str = "PNG"):
    from PIL import Image

    colour = {"L": 128, "1": 1, "I;16": 40000, "CMYK": (10, 20, 30, 0), "RGBA": (200, 10, 10, 128),
              "P": 3, "LA": (100, 50)}[mode]  # fmt: skip
    Image.new(mode, size, colour).save(path, fmt)
    return path.name


def test_odd_image_modes_are_kept_and_load_as_rgb(tmp_path):
    from m4i_assets.data.images import load_image_tensor

    files = [_png(tmp_path / "gray.png", "L"), _png(tmp_path / "bits.png", "1"), _png(tmp_path / "deep.png", "I;16"),
             _png(tmp_path / "cmyk.jpg", "CMYK", fmt="JPEG"), _png(tmp_path / "alpha.png", "RGBA"),
             _png(tmp_path / "palette.png", "P"), _png(tmp_path / "gray_alpha.png", "LA")]  # fmt: skip
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": f, "caption": f"image {f}"}) for f in files) + "\n")
    out = read_manifest(manifest, "modes")
    assert out.rejects.height == 0 and out.records.height == len(files)
    pixels = load_image_tensor(out.records["image_uri"].to_list(), 16)
    assert pixels.shape == (len(files), 3, 16, 16) and bool(((pixels >= 0) & (pixels <= 1)).all())


def test_bombs_truncation_and_encodings_are_rejected_with_reasons(tmp_path):
    big = _png(tmp_path / "big.png", "1", size=(400, 300))
    ok = _png(tmp_path / "ok.png", "L")
    full = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])  # truncated
    (tmp_path / "fake.jpg").write_bytes(b"<html>not a jpeg</html>")  # non-image bytes, image extension
    lines = [
        json.dumps({"image": big, "caption": "claims 120k pixels"}).encode(),
        json.dumps({"image": ok, "caption": "fine"}).encode(),
        json.dumps({"image": "cut.png", "caption": "truncated"}).encode(),
        json.dumps({"image": "fake.jpg", "caption": "html"}).encode(),
        b'{"image": "ok.png", "caption": "caf\xe9 latin-1"}',  # not UTF-8
        json.dumps({"image": ok, "caption": "x" * 1001}).encode(),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    out = read_manifest(manifest, "bad", RowRules(max_pixels=100_000))
    assert out.rows_in == 6 == out.records.height + out.rejects.height and out.records["caption"].to_list() == ["fine"]
    assert dict(zip(out.rejects["locator"], out.rejects["reason"])) == {
        "m.jsonl:1": "image_too_large", "m.jsonl:3": "undecodable_image", "m.jsonl:4": "undecodable_image",
        "m.jsonl:5": "not_utf8", "m.jsonl:6": "overlong_caption"}  # fmt: skip

    csv = tmp_path / "m.csv"
    csv.write_bytes(b"image,caption\nok.png,plain ascii\nok.png,caf\xe9 latin-1\n")
    out = read_manifest(csv, "csv")
    assert out.records["caption"].to_list() == ["plain ascii"] and out.rejects["reason"].to_list() == ["not_utf8"]


def test_controlled_roles_take_nonmembers_from_the_shifted_set_and_the_second_domain_as_population():
    import polars as pl

    from m4i_assets.data.roles import controlled_roles

    main = [f"m{i:02d}" for i in range(20)]
    spec = RoleSpec(n_members=4, n_nonmembers=3, n_known_nonmembers=2, seed=1)
    roles = controlled_roles("demo", ("main", main), spec, ("shifted", [f"s{i}" for i in range(5)]),
                             ("second", ["x1", "x2", main[0]]))  # fmt: skip
    by_dataset = dict(roles.group_by("dataset").len().iter_rows())
    assert by_dataset == {"main": 20, "shifted": 3, "second": 2}  # main[0] keeps its main-dataset role
    assert set(roles.filter(pl.col("dataset") == "shifted")["role"]) == {"nonmember"}
    assert set(roles.filter(pl.col("dataset") == "second")["role"]) == {"population"}
    assert (roles["audit"] == "demo").all() and roles["record_id"].is_sorted()
    plain = controlled_roles("demo", ("main", main), spec)
    assert plain.filter(pl.col("role") == "nonmember").height == 3 and set(plain["dataset"]) == {"main"}
