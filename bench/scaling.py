"""How the CLIP audit's cost grows with its records: the same audit at several candidate counts.

    PYTHONPATH=$PWD .venv/bin/python bench/scaling.py [--sizes 1000 4000 16000]

For each size N (N candidates: N/2 members and N/2 non-members, plus N/4 known non-members and N/4 population,
so an embedded corpus of 1.5 N records), on the `tiny` profile's model and CPU settings with one training
epoch: ingest (source_shards, records, record_roles), the models and the reference models' embeddings (not
timed: training is not a per-record stage), then the target's stages one by one. Each stage runs in a process
of its own (so its peak RSS is its own; imports are not timed) through Dagster's `materialize`, as the demo's
in-process runs do.

Prints, per stage and size, seconds per 1,000 candidates and peak RSS, then for each stage the ratio of its
per-record cost at the largest size to the smallest; the last line is the largest of those ratios:
`per-record cost ratio: X.XX`."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (stage, asset selection, whose partition: None, "shard" or "target"); the target's assets are the CLIP family's
STAGES = [
    ("ingest", ["source_shards"], "shard"),
    ("ingest", ["records", "record_roles"], None),
    ("embed", ["clip/model_checkpoint"], "target"),
    ("embed", ["clip/embeddings"], "target shards"),
    ("augment", ["clip/augmentation_deltas"], "target shards"),
    ("csa", ["clip/csa_scores"], "target"),
    ("aea", ["clip/aea_scores"], "target"),
    ("wsa", ["clip/pseudo_labels", "clip/wsa_attack_model", "clip/wsa_scores"], "target"),
    ("ref_calibrated", ["clip/ref_calibrated_scores"], "target"),
    ("blind_baseline", ["clip/blind_baseline_scores"], "target"),
    ("metrics", ["clip/attack_metrics"], "target"),
]


def settings_for_size(n: int):
    from m4i_assets.settings import PROFILES, AuditSettings

    quarter = n // 4
    return AuditSettings(**{**PROFILES["tiny"], "audit": f"scale{n}", "corpus_name": f"synthetic_shapes_{n}",
                            "corpus_records": n + 2 * quarter, "n_members": n // 2, "n_nonmembers": n - n // 2,
                            "n_known_nonmembers": quarter, "second_domain_records": 0, "clip_epochs": 1,
                            "embed_batch_size": 256})  # fmt: skip


def _materialize(home: Path, n: int, selection: list[str], partition: str | None, out) -> None:
    """In a child process: one materialization, reporting (success, seconds, peak RSS in MiB)."""
    from dagster import DagsterInstance, materialize

    from m4i_assets.defs.definitions import build_assets, build_resources

    resources = build_resources(home=home, settings=settings_for_size(n))
    assets = build_assets(resources)
    try:
        with DagsterInstance.from_config(str(home / "dagster")) as instance:
            start = time.perf_counter()
            result = materialize(assets, resources=resources, instance=instance, selection=selection,
                                 partition_key=partition, raise_on_error=False)  # fmt: skip
            seconds = time.perf_counter() - start
        out.send((result.success, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    except BaseException as exc:
        out.send((False, repr(exc), 0.0))
        raise


def run(home: Path, n: int, selection: list[str], partition: str | None) -> tuple[float, float]:
    receive, send = multiprocessing.Pipe(duplex=False)
    # spawned, not forked: DuckDB's threads in this process (its reads of the models) would deadlock a fork
    child = multiprocessing.get_context("spawn").Process(target=_materialize, args=(home, n, selection, partition,
                                                                                    send))  # fmt: skip
    child.start()
    send.close()  # the child holds the only sending end: recv() ends if it dies
    try:
        ok, seconds, rss = receive.recv()
    except EOFError:
        ok, seconds = False, f"the process died with exit code {child.exitcode}"
    child.join()
    if not ok:
        raise SystemExit(f"{selection} failed at {n} records (partition {partition}): {seconds}")
    return seconds, rss


def audit(n: int) -> dict[str, tuple[float, float]]:
    """{stage: (seconds, peak RSS MiB)} of one audit of `n` candidates in a fresh home."""
    from m4i_assets.data.shards import Shard
    from m4i_assets.data.sources import shard_partition_keys
    from m4i_assets.defs.assets.data import audit_sources
    from m4i_assets.defs.partitions import shard_partition_key
    from m4i_assets.defs.resources import Storage
    from m4i_assets.orchestration import prepare_dagster_home

    costs: dict[str, tuple[float, float]] = {}

    def add(stage: str, seconds: float, rss: float) -> None:
        before = costs.get(stage, (0.0, 0.0))
        costs[stage] = (before[0] + seconds, max(before[1], rss))

    with tempfile.TemporaryDirectory(prefix=f"m4i-scale-{n}-") as tmp:
        home = Path(tmp)
        prepare_dagster_home(home)
        storage = Storage(home=str(home))
        settings = settings_for_size(n)
        shards = shard_partition_keys(audit_sources(settings, storage))
        target = None
        for stage, selection, partition in STAGES:
            if stage == "embed" and target is None:  # untimed: the models, and what the references give
                run(home, n, ["target_clip", "null_control_clip", "reference_clips", "reference_embeddings"], None)
                [target] = storage.repository.latest_versions(settings.audit, "target")
            if partition == "shard":
                keys = shards
            elif partition == "target shards":
                keys = [shard_partition_key(target, Shard(i, settings.record_shards))
                        for i in range(settings.record_shards)]  # fmt: skip
            else:
                keys = [target if partition == "target" else None]
            for key in keys:
                add(stage, *run(home, n, selection, key))
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    args = parser.parse_args()
    os.environ.setdefault("M4I_PROFILE", "tiny")
    results = {}
    for n in args.sizes:
        start = time.perf_counter()
        results[n] = audit(n)
        stages = ", ".join(f"{stage} {s:.2f} s {rss:,.0f} MiB" for stage, (s, rss) in results[n].items())
        print(f"{n:,} candidates: {time.perf_counter() - start:.0f} s in all; {stages}", flush=True)
    stages = list(dict.fromkeys(stage for stage, _, _ in STAGES))
    print(f"\n{'stage':<15}" + "".join(f"{f'{n:,}: s/1k, peak MiB':>26}" for n in args.sizes) + f"{'ratio':>8}")
    ratios = []
    small, large = args.sizes[0], args.sizes[-1]
    for stage in stages:
        per_k = {n: results[n][stage][0] / n * 1000 for n in args.sizes}
        ratios.append(per_k[large] / per_k[small])
        cells = "".join(f"{f'{per_k[n]:.3f} s, {results[n][stage][1]:,.0f}':>26}" for n in args.sizes)
        print(f"{stage:<15}{cells}{ratios[-1]:>8.2f}")
    print(f"per-record cost ratio: {max(ratios):.2f}")


if __name__ == "__main__":
    main()
