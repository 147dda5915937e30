"""The Dagster UI serves the platform: start the webserver on 127.0.0.1 and ask its GraphQL API for the
asset graph, the asset checks, the sensor and the schedules."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUERY = """
{
  assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name } } } }
  repositoriesOrError { ... on RepositoryConnection { nodes { sensors { name } schedules { name cronSchedule } } } }
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    home = tmp_path_factory.mktemp("ui")
    (home / "dagster").mkdir()
    port = free_port()
    env = {**os.environ, "M4I_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), "M4I_PROFILE": "tiny"}
    cmd = [sys.executable, "-m", "dagster_webserver", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
                break
            except OSError:
                assert proc.poll() is None, "the webserver exited"
                assert time.monotonic() < deadline, "the webserver did not answer within 120 s"
                time.sleep(1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_graphql_lists_assets_checks_sensor_and_schedules(webserver):
    data = graphql(webserver, QUERY)
    assert "errors" not in data, data.get("errors")
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["data"]["assetNodes"]}
    assert {"records", "record_roles", "target_clip", "embeddings", "csa_scores", "attack_metrics",
            "target_captioner", "generated_captions", "m4i_mb_scores", "m4i_scenarios"} <= set(nodes)  # fmt: skip
    checks = {c["name"] for n in nodes.values() for c in (n["assetChecksOrError"].get("checks") or [])}
    assert {"rows_accounted_for", "finite_unit_embeddings", "candidates_scored", "shift_gate",
            "one_caption_per_record"} <= checks  # fmt: skip
    [repo] = data["data"]["repositoriesOrError"]["nodes"]
    assert {s["name"] for s in repo["sensors"]} == {"watched_models_sensor"}
    assert {(s["name"], s["cronSchedule"]) for s in repo["schedules"]} == {
        ("weekly_clip_reaudit", "0 3 * * 1"), ("weekly_captioner_reaudit", "0 3 * * 1")}  # fmt: skip
