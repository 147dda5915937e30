"""The Dagster UI serves the platform: start the webserver on 127.0.0.1 and ask its GraphQL API for the
asset graph, the asset checks, the sensors (the watched folder, the weekly re-audits)."""

import json
import urllib.request

import pytest

from m4i_assets.cli import dagster_webserver

QUERY = """
{
  assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name } } } }
  repositoriesOrError { ... on RepositoryConnection { nodes { sensors { name } schedules { name cronSchedule } } } }
}
"""


def graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    with dagster_webserver(tmp_path_factory.mktemp("ui")) as url:
        yield url


def test_graphql_lists_assets_checks_and_sensors(webserver):
    data = graphql(webserver, QUERY)
    assert "errors" not in data, data.get("errors")
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["data"]["assetNodes"]}
    assert {"records", "record_roles", "target_clip", "clip/embeddings", "clip/csa_scores", "clip/attack_metrics",
            "reference_embeddings", "target_captioner", "captioner/generated_captions", "captioner/m4i_mb_scores",
            "captioner/m4i_scenarios", "m4i_attack_models"} <= set(nodes)  # fmt: skip
    checks = {c["name"] for n in nodes.values() for c in (n["assetChecksOrError"].get("checks") or [])}
    assert {"rows_accounted_for", "finite_unit_embeddings", "candidates_scored", "shift_gate",
            "one_caption_per_record"} <= checks  # fmt: skip
    [repo] = data["data"]["repositoriesOrError"]["nodes"]
    assert {s["name"] for s in repo["sensors"]} == {
        "watched_models_sensor", "weekly_clip_reaudit", "weekly_captioner_reaudit"}  # fmt: skip
    assert repo["schedules"] == []  # the weekly re-audits are sensors: a schedule cannot ask for a backfill
