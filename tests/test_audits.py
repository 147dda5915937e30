"""Audits as first-class objects: each audit sees its own records, roles and models, also when two audits
share a home and their datasets share records."""

from conftest import ingest
from dagster import DagsterInstance

from m4i_assets.defs.definitions import build_resources
from m4i_assets.settings import PROFILES, AuditSettings


def test_two_audits_whose_datasets_share_records_keep_their_own(tmp_path):
    """The `defenses` profile's 1k corpus repeats the first 1000 records of the demo's 2.5k one: the same
    record ids in two datasets. Each audit must read its records from its own dataset (a population of the
    second audit used to come out empty)."""
    big = AuditSettings(**PROFILES["tiny"])
    small = AuditSettings(**{**PROFILES["tiny"], "audit": "small", "corpus_records": 160,
                             "corpus_name": "shapes_160", "second_domain_records": 0, "n_members": 32,
                             "n_nonmembers": 32, "n_known_nonmembers": 32})  # fmt: skip
    instance = DagsterInstance.ephemeral()
    for settings in (big, small):
        ingest(build_resources(home=tmp_path, settings=settings), instance)
    storage = build_resources(home=tmp_path, settings=small)["storage"]
    shared = storage.read("SELECT count(*) AS n FROM records a JOIN records b USING (record_id) "
                          "WHERE a.dataset = 'synthetic_shapes' AND b.dataset = 'shapes_160'")["n"][0]  # fmt: skip
    assert shared == 160  # the premise: every record of the small corpus is also in the big one
    for settings, n_population in ((small, 160 - 96), (big, 240 - 144 + 96)):
        population = storage.audit_records(settings.audit, ("population",), dataset=settings.main_dataset())
        everything = storage.audit_records(settings.audit, ("member", "nonmember", "known_nonmember", "population"))
        assert population.height == n_population - (96 if settings is big else 0)
        assert everything.height == everything["record_id"].n_unique() == n_population + 3 * settings.n_members
        datasets = {settings.main_dataset(), *([] if settings is small else ["synthetic_sketches"])}
        assert set(everything["dataset"]) == datasets
        corpus = str(storage.corpus_dir(settings.main_dataset()))
        main = everything.filter(everything["dataset"] == settings.main_dataset())
        assert all(uri.startswith(corpus) for uri in main["image_uri"])
