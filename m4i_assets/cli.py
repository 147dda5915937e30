"""`m4i`: run audits through Dagster (the embedded controlled demo, or audits of the registry) and print their metrics.

m4i demo [--family clip|captioner|all]   run the embedded audit as backfills through the Dagster daemon
m4i audit NAME | --all   run audits of the registry ($M4I_HOME/audits.yaml): ingest, register, audit, report
m4i ingest    ingest every registered source; print rows in / records / rejects per dataset
m4i home      prepare $M4I_HOME/dagster and print it (for `DAGSTER_HOME=... dagster dev`)
m4i report    print the headline tables from the warehouse
m4i ui-check  serve the Dagster UI on 127.0.0.1 and screenshot the asset graph with headless Chromium
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from m4i_assets import orchestration
from m4i_assets.data.audits import AuditSpec, load_audits
from m4i_assets.data.sources import partition_key, shard_partition_keys
from m4i_assets.defs.assets.data import audit_sources, shard_outputs
from m4i_assets.defs.assets.evaluation import version_verdicts
from m4i_assets.defs.automation import AUDIT_TAGS, STAGES, audit_runs
from m4i_assets.defs.resources import Storage
from m4i_assets.families import FAMILIES
from m4i_assets.metrics.report import comparisons_markdown, target_seed_spread, target_spread_markdown, verdict_lines
from m4i_assets.orchestration import prepare_dagster_home
from m4i_assets.settings import AuditSettings, m4i_home, settings_for

REPO = Path(__file__).resolve().parents[1]


class Orchestrator:
    """The backfills of one `m4i` command on its home's instance (`orchestration`): each phase is submitted
    to the daemon (the running one, or one started for the command) and followed to its end."""

    def __init__(self, home: Path, env: dict[str, str], settings: AuditSettings, logs: Path) -> None:
        from dagster import DagsterInstance

        from m4i_assets.defs.definitions import build_definitions

        self.settings, self.logs = settings, logs
        self.instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
        self._daemon = orchestration.daemon(self.instance, env, logs / "daemon.log")
        self._build = lambda: build_definitions(home, settings).resolve_asset_graph()

    def __enter__(self) -> Orchestrator:
        if not self._daemon.__enter__():
            print("m4i: submitting to the Dagster daemon already running on this home", flush=True)
        self.graph = self._build()  # while the daemon's code server loads the same definitions
        return self

    def __exit__(self, *exc) -> None:
        self._daemon.__exit__(*exc)
        self.instance.dispose()

    def phase(self, what: str, partitions: list[tuple[str, str | None]], audit: bool = False) -> None:
        """One backfill of (asset key, partition) pairs, followed to its end; exits on a failed run. An `audit`
        backfill's runs (one per partition) run their steps in process and count against the queue's audits."""
        start = time.monotonic()
        subset = orchestration.partitions_subset(self.graph, partitions)
        backfill = orchestration.submit(self.instance, subset, what, self.settings,
                                        orchestration.execution_config(in_process=audit),
                                        AUDIT_TAGS if audit else None)  # fmt: skip
        print(f"m4i: {what} (backfill {backfill}, {len(partitions)} asset partitions) ...", flush=True)
        status = orchestration.follow(self.instance, backfill)
        if status.value != "COMPLETED_SUCCESS":
            raise SystemExit(f"m4i: {what} ended {status.value}: the errors above, its runs in the Dagster UI")
        print(f"m4i: {what} done in {time.monotonic() - start:.0f}s", flush=True)

    def sources(self, settings: AuditSettings, storage: Storage) -> None:
        """Every source shard of the settings' sources (one backfill: `records`, which merges them, is the next)."""
        self.phase("sources, shard by shard", [("source_shards", key) for key in
                                               shard_partition_keys(audit_sources(settings, storage))])  # fmt: skip

    def audit(self, what: str, versions: list[tuple[str, AuditSpec | None, str]]) -> None:
        """The audit of each (family, audit, version), one backfill per stage of `automation.STAGES` (each of one
        wave: `orchestration`): the checkpoints, every record shard's signals, then the rest of each version."""
        runs = [run for family, audit, version in versions
                for run in audit_runs(family, audit, version, self.settings.record_shards)]  # fmt: skip
        for stage in STAGES:
            partitions = [(key, partition) for name, keys, partition in runs if name == stage for key in keys]
            if partitions:
                self.phase(f"{what}: {stage}", partitions, audit=True)


def report(storage: Storage, versions: list[str] | None = None) -> str:
    """The headline table (one row per model version and attack) and, for captioners, the M^4I scenarios."""
    frame, scenarios = storage.repository.report("metrics_by_attack"), storage.repository.report("m4i_scenarios")
    if versions is not None:
        frame = frame.filter(frame["model_version"].is_in(versions))
        scenarios = scenarios.filter(scenarios["model_version"].is_in(versions))
    header = (f"{'model_version':<23} {'role':<13} {'attack':<15} {'n mem/non':>9}  {'AUC [95% CI]':<22} "
              f"{'bal.acc':>7}  {'TPR@1%FPR [95% CI]':<22} {'TPR@0.1%FPR [95% CI]':<22} "
              f"{'known-thr. TPR@1% [CP CI]':<26} {'its FPR [CP CI]':<22} mlflow_run_id")  # fmt: skip
    lines = [header]
    for r in frame.to_dicts():
        lines.append(
            f"{r['model_version']:<23} {r['model_role']:<13} {r['attack']:<15} "
            f"{r['n_members']:>4}/{r['n_nonmembers']:<4}  {r['auc_95ci']:<22} {r['balanced_accuracy']:>7.3f}  "
            f"{r['tpr_at_1pct_fpr_95ci']:<22} {r['tpr_at_0_1pct_fpr_95ci']:<22} "
            f"{r['known_threshold_tpr_1pct_95ci']:<26} {r['known_threshold_fpr_1pct_95ci']:<22} {r['mlflow_run_id']}"
        )
    if scenarios.height:
        lines += ["", f"{'model_version':<23} {'role':<13} {'attack':<12} {'scenario':<16} {'shadow data, arch':<29} "
                      f"{'AUC [95% CI]':<22} {'AUC over seeds':<16} {'TPR@1%FPR [95% CI]':<22} success"]  # fmt: skip
        for r in scenarios.to_dicts():
            lines.append(
                f"{r['model_version']:<23} {r['model_role']:<13} {r['attack']:<12} {r['scenario']:<16} "
                f"{r['shadow_dataset'] + ', ' + r['shadow_arch']:<29} {r['auc_95ci']:<22} {r['auc_over_seeds']:<16} "
                f"{r['tpr_at_1pct_fpr_95ci']:<22} {_rate(r['attack_success_rate'])}"
            )
    return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def controlled_targets(storage: Storage, settings: AuditSettings, family: str) -> list[str]:
    """The audit's `target_seeds` newest targets of a family, first seed first (the defended versions' base)."""
    repo = storage.repository
    versions = repo.latest_versions(settings.audit, "target", settings.target_seeds, family=family)
    return sorted(versions, key=lambda v: json.loads(repo.model_info(v)["train_config"] or "{}").get("seed", 0))


def print_frontiers(storage: Storage, audit: str) -> None:
    """Per family of `defense_evaluations`: each defense's worst attack (the stronger attacker's) beside every
    other defense's curve at its utility, and the best defense at matched utility (`metrics.privacy_utility`)."""
    from m4i_assets.metrics import privacy_utility as pu

    rows = storage.repository.defense_evaluations(audit)
    for (family,), frame in rows.group_by(["family"], maintain_order=True):
        points = pu.curve_points(frame)
        print(f"\n{family}: privacy-utility points and the frontier at matched utility\n\n"
              f"{pu.defense_markdown(frame)}\n\n{pu.matched_utility_markdown(points)}\n\n"
              f"best at matched utility: {json.dumps(pu.best_at_matched_utility(points))}")  # fmt: skip


def demo(families: list[str], defenses: bool = False) -> None:
    home = m4i_home()
    env = {**os.environ, "M4I_HOME": str(home), "DAGSTER_HOME": str(prepare_dagster_home(home))}
    settings = settings_for()
    if defenses and settings.target_seeds > 1:
        raise SystemExit("m4i demo --defenses defends one target: set target_seeds to 1")
    start = time.monotonic()
    print(f"m4i demo: audit {settings.audit!r} of {' and '.join(families)} models, everything under {home}", flush=True)
    logs = home / "logs"
    storage = Storage(home=str(home))
    storage.warehouse.publish_catalog()  # SQL users may open it read-only from now on, while the demo writes
    with Orchestrator(home, env, settings, logs) as runs:
        # The sources shard by shard, then one backfill (one run, ordered by lineage) of records, roles, every
        # model, the defended versions and the helpers' signals (the reference CLIPs' embeddings, the shadow
        # captioners' attack models) the per-version attacks read.
        models = ["records", "record_roles", *(a for f in families for a in FAMILIES[f].models)]
        models += [FAMILIES[f].defended for f in families if defenses]
        models += [FAMILIES[f].helper_asset for f in families]
        runs.sources(settings, storage)
        runs.phase("records, roles, models and the helpers' signals", [(m, None) for m in models])
        # Then each audited version's partitions: its signals shard by shard, its attacks and metrics.
        targets = {f: controlled_targets(storage, settings, f) for f in families}
        repo = storage.repository
        audited = {f: [*targets[f], repo.latest_versions(settings.audit, "null_control", family=f)[0]]
                   for f in families}  # fmt: skip
        if defenses:
            for f in families:
                audited[f] += repo.defended_versions(audited[f][0])
        runs.audit("audit of the targets, the null controls" + " and the defended versions" * defenses,
                   [(f, None, v) for f in families for v in audited[f]])  # fmt: skip
        if defenses:
            runs.phase("defense evaluations", [("defense_evaluations", None)])
    versions = [v for f in families for v in audited[f]]
    print(f"\nm4i demo: done in {time.monotonic() - start:.0f}s. Headline metrics:\n")
    print(report(storage, versions))
    for version in versions:
        v = version_verdicts(storage, settings, version)
        role = storage.repository.model_info(version)["role"]
        print(f"\n{role} {version}: paired comparisons (attack_comparisons)\n")
        print(comparisons_markdown(v["comparisons"]) + "\n")
        print(
            "\n".join(
                verdict_lines(
                    v["rows"], v["comparisons"], settings.shift_gate_margin, v["known_vs_candidates"], v["permutation"]
                )
            )
        )
    for f in families:
        rows = repo.of_versions("attack_metrics", targets[f]).select("attack", "auc", "tpr_at_1pct_fpr").to_dicts()
        print(f"\n{f} target: " + target_spread_markdown(target_seed_spread(rows)))
    if defenses:
        table = repo.report("defense_evaluations")
        with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=250, fmt_str_lengths=40):
            print(f"\nDefenses (sql/queries/defense_evaluations.sql; every attack in defense_evaluations):\n{table}")
        print_frontiers(storage, settings.audit)
    print(
        f"\nDagster UI: make dev   |   SQL: duckdb {home / 'warehouse.duckdb'}   |   "
        f"MLflow: mlflow ui --backend-store-uri sqlite:///{home / 'mlflow.db'}"
    )


def audit_environment(home: Path, audit: str | None = None) -> tuple[dict[str, str], AuditSettings]:
    """The environment of the Dagster runs of an audit (`M4I_SETTINGS` with `audit` on top) and its settings."""
    overrides = json.loads(os.environ.get("M4I_SETTINGS") or "{}")
    if audit is not None:
        overrides["audit"] = audit
    env = {**os.environ, "M4I_HOME": str(home), "DAGSTER_HOME": str(prepare_dagster_home(home)),
           "M4I_SETTINGS": json.dumps(overrides)}  # fmt: skip
    os.environ["M4I_SETTINGS"] = env["M4I_SETTINGS"]
    return env, settings_for()


def ingestion_table(storage: Storage, sources: list) -> str:
    """rows in (the shards' own counts) / records / rejects, with the reasons, per dataset."""
    lines = [f"{'dataset':<24} {'rows in':>8} {'records':>8} {'rejects':>8}  reasons"]
    repo = storage.repository
    for source in sources:
        keys = [partition_key(source, shard) for shard in source.shard_ids()]
        rows_in = sum(json.loads(shard_outputs(storage, k)[2].read_text())["rows_in"] for k in keys)
        n_records, reasons = repo.record_count([source.name]), repo.reject_reasons([source.name])
        text = ", ".join(f"{r} {n}" for r, n in reasons.items())
        lines.append(f"{source.name:<24} {rows_in:>8} {n_records:>8} {sum(reasons.values()):>8}  {text}")
    return "\n".join(lines)


def ingest() -> None:
    """`m4i ingest`: every registered source (and the embedded corpora of the settings' audit)."""
    home = m4i_home()
    env, settings = audit_environment(home)
    storage = Storage(home=str(home))
    with Orchestrator(home, env, settings, home / "logs") as runs:
        runs.sources(settings, storage)
        runs.phase("records", [("records", None)])
    print(ingestion_table(storage, audit_sources(settings, storage)))


def run_audit(spec: AuditSpec) -> list[str]:
    """`m4i audit NAME`: ingest the audit's sources, register its checkpoints, run its plan through Dagster and
    print the headline table; returns the audited versions."""
    home = m4i_home()
    env, settings = audit_environment(home, spec.name)
    storage = Storage(home=str(home))
    logs = home / "logs" / spec.name
    print(f"m4i audit: {spec.name!r} ({spec.kind} {spec.family} audit of {spec.dataset}), under {home}", flush=True)
    family = FAMILIES[spec.family]
    target, null_control, helpers = family.models
    has_helpers = family.audit_has_helpers(spec)
    models = ["records", "record_roles", "audit_plan", target, *[null_control] * bool(spec.null_control)]
    models += [helpers, family.helper_asset] * has_helpers
    with Orchestrator(home, env, settings, logs) as runs:
        runs.sources(settings, storage)
        runs.phase("records, roles, plan, models and the helpers' signals", [(m, None) for m in models])
        repo = storage.repository
        audited = repo.latest_versions(spec.name, "target", len(spec.targets), family=spec.family)
        audited += repo.latest_versions(spec.name, "null_control", family=spec.family) if spec.null_control else []
        runs.audit("audit of the targets" + " and the null control" * bool(spec.null_control),
                   [(spec.family, spec, v) for v in audited])  # fmt: skip
    print(f"\nm4i audit {spec.name}: headline metrics\n")
    print(report(storage, audited))
    plan = repo.plan(spec.name)
    print("\nPlan (audit_plan):\n" + "\n".join(f"  {r['attack']:<15} {r['status']:<8} {r['reason']}"
                                             for r in plan.to_dicts()))  # fmt: skip
    if spec.kind == "unlabelled":
        print("\n" + membership_rate_table(storage, audited))
    return audited


def membership_rate_table(storage: Storage, versions: list[str]) -> str:
    """The estimated membership rate of each version of an unlabelled audit."""
    rows = storage.repository.membership_rates(versions)
    lines = [f"{'model_version':<32} {'role':<13} {'attack':<7} {'candidates':>10} {'alpha':>6} "
             f"{'above':>6}  estimated membership rate [95% CI]"]  # fmt: skip
    for r in rows.to_dicts():
        lines.append(f"{r['model_version']:<32} {r['role']:<13} {r['attack']:<7} {r['n_candidates']:>10} "
                     f"{r['alpha']:>6.3f} {r['share_above']:>6.3f}  {r['estimated_rate']:.3f} "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]")  # fmt: skip
    return "\n".join(lines)


@contextmanager
def dagster_webserver(home: Path, port: int | None = None, timeout: float = 120) -> Iterator[str]:
    """The Dagster webserver for `home` on 127.0.0.1 (its base URL) while the block runs."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    env = {**os.environ, "M4I_HOME": str(home), "DAGSTER_HOME": str(prepare_dagster_home(home))}
    cmd = [sys.executable, "-m", "dagster_webserver", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1",
           "-p", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the Dagster webserver did not come up on {url}") from None
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip
"""Headless Chromium on a machine with no network: without the background-networking flags it keeps dialling out."""


def ui_check(home: Path) -> list[Path]:
    """What a person sees in the Dagster UI, as PNGs under `home/ui/`, each checked to show what it should: the
    whole asset graph with every group expanded (Dagster's "Join the community" dialog dismissed), the latest
    target's `attack_metrics` materialization with its metrics table, its paired-comparison table, and its log-log
    ROC plot. Drives Debian's Chromium with Playwright; needs a home where an audit has run (`make demo`)."""
    from playwright.sync_api import sync_playwright

    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser") if shutil.which(b)), None)
    if browser is None:
        raise SystemExit("m4i ui-check needs Chromium: `apt-get install chromium` as root (`make ui-check` does it)")
    target = Storage(home=str(home)).repository.newest_target() if (home / "warehouse.duckdb").is_file() else None
    if target is None:
        raise SystemExit(f"no audited target in {home}: run `make demo` first")
    out = home / "ui"
    out.mkdir(parents=True, exist_ok=True)
    shots = [out / "asset_graph.png", out / "attack_metrics.png", out / "attack_comparisons.png", out / "roc_plot.png"]
    with dagster_webserver(home) as url, sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=browser, args=CHROMIUM_FLAGS)
        page = chromium.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{url}/asset-groups", wait_until="networkidle")
        skip = page.get_by_role("button", name="Skip")
        try:  # the community dialog shows until someone dismisses it on this instance
            skip.click(timeout=5000)
        except Exception:  # noqa: BLE001 - Playwright's TimeoutError: no dialog this time
            pass
        page.mouse.click(1000, 700, button="right")  # the graph's context menu
        page.get_by_role("menuitem", name="Expand all groups").click()
        page.wait_for_timeout(2000)
        # collapsed groups show only their names; expanded, the models group shows its assets
        if page.get_by_text("Join the Dagster community").count() or not page.get_by_text("model_checkpoint").count():
            raise SystemExit("the asset graph did not show expanded: the dialog is still up or no asset is visible")
        page.screenshot(path=shots[0])
        family = Storage(home=str(home)).repository.model_info(target)["family"]
        page.goto(f"{url}/assets/{family}/attack_metrics?view=events", wait_until="networkidle")
        page.get_by_text(target).first.click()
        page.wait_for_timeout(1000)
        if not page.get_by_text("TPR@1%FPR").count():
            raise SystemExit(f"attack_metrics of {target} shows no metrics table")
        comparisons = page.get_by_text("attack_comparisons")
        if not comparisons.count():
            raise SystemExit(f"attack_metrics of {target} shows no paired comparisons (attack_comparisons)")
        page.screenshot(path=shots[1], full_page=True)
        comparisons.first.scroll_into_view_if_needed()
        page.screenshot(path=shots[2])
        page.get_by_text("[Show Markdown]").first.click()
        plot = page.locator("[role=dialog] img")
        plot.first.wait_for(timeout=10000)
        if not plot.first.get_attribute("src").startswith("data:image/png"):
            raise SystemExit(f"attack_metrics of {target} shows no ROC plot")
        page.wait_for_timeout(1000)  # the dialog fades in
        page.screenshot(path=shots[3])
        chromium.close()
    return shots


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="m4i", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("command", choices=["demo", "audit", "ingest", "home", "report", "ui-check"])
    parser.add_argument("name", nargs="?", help="m4i audit: the audit's name in the audit registry")
    parser.add_argument("--all", action="store_true", help="m4i audit: every audit of the registry")
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="clip", help="which audit the demo runs")
    parser.add_argument("--defenses", action="store_true", help="also train, audit and evaluate defended versions")
    args = parser.parse_args(argv)
    if args.command == "audit":
        registry = settings_for().audit_registry_path(m4i_home())
        audits = {a.name: a for a in load_audits(registry)}
        if args.all == bool(args.name):
            parser.error("m4i audit takes an audit's name or --all")
        if args.name and args.name not in audits:
            raise SystemExit(f"m4i audit: no audit {args.name!r} in {registry} (audits: {sorted(audits)})")
        for name in sorted(audits) if args.all else [args.name]:
            run_audit(audits[name])
    elif args.command == "ingest":
        ingest()
    elif args.command == "demo":
        demo(list(FAMILIES) if args.family == "all" else [args.family], defenses=args.defenses)
    elif args.command == "ui-check":
        print("m4i ui-check: saved " + ", ".join(str(p) for p in ui_check(m4i_home())))
    elif args.command == "home":
        print(prepare_dagster_home(m4i_home()))
    else:
        print(report(Storage(home=str(m4i_home()))))


if __name__ == "__main__":
    main()
