"""Record shards: a version's model-forward signals computed shard by shard (partitions `shard|version`) give the
same numbers as computed whole, down to every table of its audit (issue 14)."""

import shutil

import polars as pl
import pytest
from conftest import materialize_audit, snapshot
from polars.testing import assert_frame_equal

from m4i_assets.data.shards import Shard, shard_of_file
from m4i_assets.storage.warehouse import Warehouse


@pytest.mark.parametrize("n_rows,batch,count", [(144, 32, 4), (144, 32, 1), (10, 32, 3), (0, 8, 2), (257, 256, 2)])
def test_shards_cover_every_row_once_at_batch_boundaries(n_rows, batch, count):
    slices = [Shard(i, count).rows(n_rows, batch) for i in range(count)]
    assert [r for s in slices for r in range(n_rows)[s]] == list(range(n_rows))
    assert all(s.start % batch == 0 or s.start == n_rows for s in slices)


def test_shard_files_are_named_and_read_back(tmp_path):
    from m4i_assets.storage.repository import Repository

    warehouse = Warehouse(tmp_path, ["embeddings"])
    repo = Repository(warehouse)
    version = "clip-abc@audit+k=8"
    frame = pl.DataFrame({"model_version": version, "record_id": [f"r{i}" for i in range(6)]})
    warehouse.write_signal("embeddings", version, frame)
    assert [s for _, s in warehouse.signal_files("embeddings", version)] == [Shard(0, 1)]
    warehouse.write_signal("embeddings", version, frame[4:], Shard(2, 3))  # a re-sharding: the whole file goes
    assert shard_of_file(f"{version}.shard-2-of-3.parquet") == (version, Shard(2, 3))
    with pytest.raises(FileNotFoundError, match=r"shards \[0, 1\] of 3 not materialized"):
        repo.signal("embeddings", version)
    warehouse.write_signal("embeddings", version, frame[:2], Shard(0, 3))
    warehouse.write_signal("embeddings", version, frame[2:4], Shard(1, 3))
    assert_frame_equal(repo.signal("embeddings", version), frame)
    assert_frame_equal(repo.signal("embeddings", version, Shard(1, 3)), frame[2:4])
    with pytest.raises(FileNotFoundError, match="shard 0 of 2 not materialized"):
        repo.signal("embeddings", version, Shard(0, 2))
    assert warehouse.read("SELECT count(*) AS n FROM embeddings")["n"][0] == 6  # the SQL view: each row once


TABLES = ("embeddings", "augmentation_deltas", "membership_scores", "pseudo_labels", "attack_metrics")


def test_four_shards_give_the_numbers_of_one(demo_home, tmp_path, monkeypatch):
    """The tiny demo's target (embedded in one shard) audited again in a copy of its home with 4 record shards:
    its 144 records are 5 batches of 32, so the shards are uneven (2, 1, 1, 1 batches). Every signal and every
    table of its audit equals the one-shard run's, to the bit."""
    from dagster import DagsterInstance

    from m4i_assets.defs.definitions import build_assets, build_resources
    from m4i_assets.settings import PROFILES, AuditSettings

    demo, _ = demo_home
    home = tmp_path / "home"
    for folder in ("lake", "signals"):
        shutil.copytree(demo / folder, home / folder)
    (home / "dagster").mkdir()
    settings = AuditSettings(**{**PROFILES["tiny"], "record_shards": 4})
    resources = build_resources(home=home, settings=settings)
    storage = resources["storage"]
    trained = "SELECT model_version FROM models WHERE role = 'target' AND train_fingerprint IS NOT NULL"
    [target] = storage.read(trained)["model_version"].to_list()  # the demo's (not a checkpoint dropped by a test)
    expected = snapshot(home, target, TABLES)
    assert expected["embeddings"].height == 144 and expected["attack_metrics"].height > 0
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("clip_versions", [target])
        materialize_audit(build_assets(resources), "clip", None, target, resources, instance)
    files = storage.warehouse.signal_files("embeddings", target)
    assert [s for _, s in files] == [Shard(i, 4) for i in range(4)]  # the one-shard file replaced
    assert [pl.read_parquet(p).height for p, _ in files] == [64, 32, 32, 16]
    actual = snapshot(home, target, TABLES)
    for table in TABLES:
        assert_frame_equal(actual[table], expected[table], check_exact=True), table
