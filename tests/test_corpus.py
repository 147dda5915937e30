import hashlib
import json

from m4i_assets.data.corpus import CorpusSpec, generate


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    spec = CorpusSpec(n_records=40, image_size=32, seed=7)
    generate(spec, tmp_path / "a")
    generate(spec, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_other_seed_other_corpus(tmp_path):
    a = generate(CorpusSpec(n_records=20, image_size=32, seed=1), tmp_path / "a").read_text()
    b = generate(CorpusSpec(n_records=20, image_size=32, seed=2), tmp_path / "b").read_text()
    assert a != b


def test_captions_unique_and_describe_the_scene(tmp_path):
    manifest = generate(CorpusSpec(n_records=300, image_size=32, seed=0), tmp_path)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    captions = [r["caption"] for r in rows]
    assert len(rows) == 300 and len(set(captions)) == 300
    for row in rows:
        meta = row["metadata"]
        assert (tmp_path / row["image"]).is_file()
        for shape, colour in zip(meta["shapes"], meta["colours"]):
            assert shape in row["caption"] and colour in row["caption"]
        assert meta["background"] in row["caption"] and meta["texture"] in row["caption"]


def test_regenerating_an_existing_corpus_is_a_no_op(tmp_path):
    spec = CorpusSpec(n_records=10, image_size=32)
    manifest = generate(spec, tmp_path)
    stamp = manifest.stat().st_mtime_ns
    generate(spec, tmp_path)
    assert manifest.stat().st_mtime_ns == stamp


def test_shifted_style_differs_in_palette_and_phrasing(tmp_path):
    base = generate(CorpusSpec(n_records=10, image_size=32), tmp_path / "a").read_text().splitlines()
    shifted = (
        generate(CorpusSpec(n_records=10, image_size=32, style="shifted"), tmp_path / "b").read_text().splitlines()
    )
    assert all("|" in json.loads(line)["caption"] for line in shifted)
    assert not any("|" in json.loads(line)["caption"] for line in base)
