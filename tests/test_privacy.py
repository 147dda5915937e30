"""Private by default: nothing the platform drives reports usage home."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_platform_turns_mlflow_telemetry_off():
    """MLflow's telemetry is on in a plain environment (no CI variable) and off once m4i_assets is imported, before
    any MLflow run is written: every process of an audit imports the package first."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    probe = "import mlflow.telemetry.utils as t; print(t.is_telemetry_disabled())"
    for prefix, expected in (("", "False"), ("import m4i_assets; ", "True")):
        out = subprocess.run([sys.executable, "-c", prefix + probe], env=env, cwd=REPO, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr[-2000:]
