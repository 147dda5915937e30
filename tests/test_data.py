import json

import pytest

from m4i_assets.data.corpus import CorpusSpec, generate
from m4i_assets.data.manifest import read_manifest, record_id
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
