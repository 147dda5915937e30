"""The warehouse as a Parquet lake: partitions replaced whole, readers that never block writers."""

import subprocess
import sys
import textwrap

import duckdb
import polars as pl
import pytest

from m4i_assets.storage.warehouse import Warehouse

SIGNALS = ("embeddings",)


def scores(version: str, attack: str, n: int, offset: float = 0.0) -> pl.DataFrame:
    return pl.DataFrame({"model_version": version, "attack": attack, "record_id": [f"r{i}" for i in range(n)],
                         "score": [offset + i for i in range(n)], "is_member": [i % 2 == 0 for i in range(n)],
                         "audit": "a"})  # fmt: skip


def count(wh: Warehouse, where: str = "true") -> int:
    return wh.read(f"SELECT count(*) AS n FROM membership_scores WHERE {where}")["n"][0]


def test_a_rewritten_partition_replaces_its_rows_only(tmp_path):
    wh = Warehouse(tmp_path, SIGNALS)
    assert count(wh) == 0  # an empty lake answers
    wh.write("membership_scores", scores("v1", "csa", 5), model_version="v1", attack="csa")
    wh.write("membership_scores", scores("v1", "aea", 3), model_version="v1", attack="aea")
    wh.write("membership_scores", scores("v1", "csa", 4, offset=10), model_version="v1", attack="csa")
    assert count(wh, "attack = 'csa'") == 4 and count(wh, "attack = 'aea'") == 3
    assert wh.read("SELECT min(score) AS s FROM membership_scores WHERE attack = 'csa'")["s"][0] == 10
    # defaults of the schema are filled in, key columns the frame lacks too
    wh.write("record_roles", pl.DataFrame({"record_id": ["r1"], "role": ["member"], "is_member": [True]}), audit="x")
    assert wh.read("SELECT audit FROM record_roles")["audit"].to_list() == ["x"]
    assert wh.read("SELECT computed_at IS NOT NULL AS t FROM membership_scores")["t"].all()
    assert sorted(p.name for p in (tmp_path / "lake" / "membership_scores").iterdir()) == [
        "_schema.parquet", "model_version=v1,attack=aea.parquet", "model_version=v1,attack=csa.parquet"]  # fmt: skip


def test_bad_writes_leave_the_old_partition(tmp_path):
    wh = Warehouse(tmp_path, SIGNALS)
    wh.write("membership_scores", scores("v1", "csa", 5), model_version="v1", attack="csa")
    duplicated = pl.concat([scores("v1", "csa", 2), scores("v1", "csa", 2)])
    with pytest.raises(duckdb.ConstraintException):
        wh.write("membership_scores", duplicated, model_version="v1", attack="csa")
    with pytest.raises(ValueError, match="other than"):
        wh.write("membership_scores", scores("v2", "csa", 2), model_version="v1", attack="csa")
    with pytest.raises(ValueError, match="partitioned by other columns"):
        wh.write("membership_scores", scores("v1", "csa", 2), model_version="v1")
    with pytest.raises(ValueError, match="not a table"):
        wh.write("no_such_table", scores("v1", "csa", 2), model_version="v1")
    # several partitions: all are checked before any is replaced
    with pytest.raises(duckdb.ConstraintException):
        wh.write_many([("membership_scores", scores("v1", "csa", 9), {"model_version": "v1", "attack": "csa"}),
                       ("membership_scores", pl.concat([scores("v1", "aea", 2)] * 2),
                        {"model_version": "v1", "attack": "aea"})])  # fmt: skip
    assert count(wh) == 5
    assert not list((tmp_path / "lake").rglob("*.tmp"))


def test_a_read_only_session_neither_blocks_writers_nor_misses_their_rows(tmp_path):
    """A user's `duckdb -readonly warehouse.duckdb` held open in another process while the platform writes."""
    wh = Warehouse(tmp_path, SIGNALS)
    assert wh.publish_catalog()
    session = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, duckdb
        conn = duckdb.connect({str(wh.database)!r}, read_only=True)
        for line in sys.stdin:
            print(conn.sql("SELECT count(*) FROM membership_scores").fetchone()[0],
                  conn.sql("SELECT count(*) FROM embeddings").fetchone()[0], flush=True)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:

        def ask() -> str:
            session.stdin.write("?\n")
            session.stdin.flush()
            return session.stdout.readline().strip()

        assert ask() == "0 0"
        wh.write("membership_scores", scores("v1", "csa", 5), model_version="v1", attack="csa")
        wh.write_signal("embeddings", "v1", pl.DataFrame({"model_version": "v1", "record_id": ["r1", "r2"]}))
        assert ask() == "5 2"
        wh.write("membership_scores", scores("v1", "csa", 3), model_version="v1", attack="csa")
        assert ask() == "3 2"
        # a change of the views cannot reach a file a reader holds: the writer goes on, the session still reads
        (tmp_path / "warehouse.version").write_text("stale")
        assert not wh.publish_catalog()
        assert ask() == "3 2"
    finally:
        session.stdin.close()
        session.wait(timeout=30)
    assert wh.publish_catalog()


def test_repository_reads_each_fact_once_and_names_its_queries(tmp_path):
    from m4i_assets.storage.home import Home

    home = Home(tmp_path)
    records = pl.DataFrame({"record_id": ["a", "b", "c", "d"], "dataset": "shapes", "caption": ["x", "y", "z", "w"],
                            "image_uri": ["i1", "i1", "i2", "i3"]})  # fmt: skip
    home.write("records", records, dataset="shapes")
    roles = pl.DataFrame({"audit": "demo", "record_id": ["a", "b", "c", "d"], "dataset": "shapes",
                          "role": ["member", "nonmember", "known_nonmember", "population"],
                          "is_member": [True, False, False, False]})  # fmt: skip
    home.write("record_roles", roles, audit="demo")
    for version, role, seed in (("clip-1", "target", 0), ("captioner-s1", "shadow", 7), ("clip-r1", "reference", 1)):
        home.write("models", pl.DataFrame([{"model_version": version, "family": version.split("-")[0], "arch": "a",
                                            "role": role, "audit": "demo", "checkpoint_uri": "-", "sha256": "-",
                                            "train_config": f'{{"seed": {seed}}}', "train_dataset": "shapes"}]),
                   model_version=version)  # fmt: skip
    repo = home.repository
    assert repo.model_info("clip-1")["role"] == "target"
    assert repo.candidates("clip-1")["record_id"].to_list() == ["a", "b"]
    assert repo.known_nonmembers("clip-1")["record_id"].to_list() == ["c"]
    home.write("models", pl.DataFrame(schema={"model_version": pl.String}), model_version="clip-1")
    assert repo.model_info("clip-1")["role"] == "target"  # read once: the repository of one asset keeps it
    with pytest.raises(LookupError, match="not registered"):
        home.repository.model_info("clip-1")
    assert repo.audit_records("demo", ("population",), dataset="other").height == 0
    assert repo.references(["b", "c"]) == [["x", "y"], ["z"]]  # a and b share the image i1
    with pytest.raises(LookupError, match="not in `records`"):
        repo.references(["a", "zz"])
    assert repo.latest_versions("demo", "reference") == ["clip-r1"] == repo.reference_versions("demo", 1)
    with pytest.raises(LookupError, match="2 needed"):
        repo.reference_versions("demo", 2)
    assert [(m["model_version"], m["train_seed"]) for m in repo.shadow_models("demo")] == [("captioner-s1", 7)]
    assert repo.record_ids("shapes") == ["a", "b", "c", "d"] and repo.shift_check("clip-1") is None
    with pytest.raises(ValueError, match="not one of"):
        repo.of_version("records", "clip-1")
