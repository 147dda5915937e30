"""`m4i`: run the embedded controlled audit through Dagster and print its headline metrics.

m4i demo      materialize the whole asset graph (multiprocess executor, persistent Dagster home)
m4i home      prepare $M4I_HOME/dagster and print it (for `DAGSTER_HOME=... dagster dev`)
m4i report    print the headline table from the warehouse
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from m4i_assets.defs.resources import Storage
from m4i_assets.metrics.report import verdict_lines
from m4i_assets.settings import m4i_home, settings_for
from m4i_assets.storage import warehouse

REPO = Path(__file__).resolve().parents[1]
UNPARTITIONED = ["corpus", "records", "record_roles", "target_clip", "null_control_clip", "reference_clips"]
# What each model role needs per version: reference models only supply signals to the calibrated attack.
SIGNALS_ONLY = ["model_checkpoint", "embeddings"]
FULL_AUDIT = [
    *SIGNALS_ONLY, "augmentation_deltas", "csa_scores", "aea_scores", "pseudo_labels", "wsa_attack_model",
    "wsa_scores", "ref_calibrated_scores", "blind_baseline_scores", "attack_metrics", "audit_report",
]  # fmt: skip
DAGSTER_YAML = """\
# Dagster instance of the M4I platform (written by `m4i home`; edit freely, it is not overwritten).
telemetry:
  enabled: false
"""


def prepare_dagster_home(home: Path) -> Path:
    """Create `$M4I_HOME/dagster` with a dagster.yaml; runs and event logs persist there."""
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    return dagster_home


def _materialize(
    selection: list[str], env: dict[str, str], log: Path, partition: str | None = None
) -> tuple[subprocess.Popen, Path]:
    """Launch one Dagster run (CLI, so the definitions' multiprocess executor runs it); log to `log`."""
    cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-f", str(REPO / "definitions.py"),
           "--select", ",".join(selection)]  # fmt: skip
    if partition:
        cmd += ["--partition", partition]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT), log


def _run_phase(what: str, launches: list, parallel: int = 2) -> None:
    """Start the runs (zero-argument callables returning (process, log)), `parallel` at a time."""
    start = time.monotonic()
    print(f"m4i demo: {what} ({len(launches)} Dagster run{'s' * (len(launches) > 1)}) ...", flush=True)
    runs, codes = [], []
    for batch in range(0, len(launches), parallel):
        started = [launch() for launch in launches[batch : batch + parallel]]
        codes += [proc.wait() for proc, _ in started]
        runs += started
    if any(codes):
        for (_, log), code in zip(runs, codes):
            if code:
                print(f"--- {log} (exit code {code}), last lines:\n" + "".join(log.read_text().splitlines(True)[-40:]))
        raise SystemExit(f"m4i demo: {what} failed; full logs above and in the Dagster UI (make dev)")
    print(f"m4i demo: {what} done in {time.monotonic() - start:.0f}s", flush=True)


def report(storage: Storage, versions: list[str] | None = None) -> str:
    """The headline table: one row per (model version, attack)."""
    with storage.connect() as conn:
        storage.refresh_views(conn)  # a warehouse nothing has written to yet still answers, empty
        frame = warehouse.query(conn, warehouse.sql_file("queries/metrics_by_attack.sql"))
    if versions is not None:
        frame = frame.filter(frame["model_version"].is_in(versions))
    header = (f"{'model_version':<18} {'role':<13} {'attack':<15} {'n mem/non':>9}  {'AUC [95% CI]':<22} "
              f"{'bal.acc':>7}  {'TPR@1%FPR [95% CI]':<22} {'TPR@0.1%FPR [95% CI]':<22} mlflow_run_id")  # fmt: skip
    lines = [header]
    for r in frame.to_dicts():
        lines.append(
            f"{r['model_version']:<18} {r['model_role']:<13} {r['attack']:<15} "
            f"{r['n_members']:>4}/{r['n_nonmembers']:<4}  {r['auc_95ci']:<22} {r['balanced_accuracy']:>7.3f}  "
            f"{r['tpr_at_1pct_fpr_95ci']:<22} {r['tpr_at_0_1pct_fpr_95ci']:<22} {r['mlflow_run_id']}"
        )
    return "\n".join(lines)


def demo() -> None:
    home = m4i_home()
    env = {**os.environ, "M4I_HOME": str(home), "DAGSTER_HOME": str(prepare_dagster_home(home))}
    settings = settings_for()
    start = time.monotonic()
    print(f"m4i demo: audit {settings.audit!r}, everything under {home}", flush=True)
    logs = home / "logs"
    _run_phase(
        "corpus, records, roles and models",
        [partial(_materialize, UNPARTITIONED, env, logs / "models.log")],
    )
    storage = Storage(home=str(home))
    references = storage.reference_versions(settings.audit, settings.n_reference_models)
    # One run per model version, two at a time: their warehouse writes queue on the file lock.
    _run_phase(
        "signals of the reference models",
        [partial(_materialize, SIGNALS_ONLY, env, logs / f"{v}.log", v) for v in references],
    )
    audited = [v for role in ("target", "null_control") for v in storage.latest_versions(settings.audit, role)]
    _run_phase("audit of the target and the null control",
               [partial(_materialize, FULL_AUDIT, env, logs / f"{v}.log", v) for v in audited])  # fmt: skip
    print(f"\nm4i demo: done in {time.monotonic() - start:.0f}s. Headline metrics:\n")
    print(report(storage, audited))
    for version in audited:
        rows = storage.read("SELECT * FROM audit_summary WHERE model_version = ? ORDER BY attack", [version])
        print(f"\n{rows['model_role'][0]} {version}:")
        print("\n".join(verdict_lines(rows.to_dicts(), settings.shift_gate_max_auc)))
    print(
        f"\nDagster UI: make dev   |   SQL: duckdb {home / 'warehouse.duckdb'}   |   "
        f"MLflow: mlflow ui --backend-store-uri sqlite:///{home / 'mlflow.db'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="m4i", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("command", choices=["demo", "home", "report"])
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo()
    elif args.command == "home":
        print(prepare_dagster_home(m4i_home()))
    else:
        print(report(Storage(home=str(m4i_home()))))


if __name__ == "__main__":
    main()
