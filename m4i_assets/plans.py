"""Who trains on what: the training plan of a controlled audit (target, null control, reference CLIPs or
shadow captioners, defended versions' validation data), each model with its training records and its seed,
all seeds derived here from the audit's seed (`seed_offset`), the fingerprint that decides reuse, and how a
plan's jobs train (in worker processes) and register (`train_and_register`).

The null control gets the target's recipe and budget on population records only (README, Rules of evidence);
each reference CLIP the target's recipe on a seeded half of the population (LiRA, Carlini et al. 2022); each
shadow captioner a seeded half of one population dataset, the other half its known non-members (M^4I,
Hu et al. 2022, section 3).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import polars as pl

from m4i_assets.data.roles import shadow_split
from m4i_assets.models.checkpoints import HF_ARCH_PREFIX, sha256_file
from m4i_assets.storage.home import Home

# Offsets from the audit's seed. A model's recipe seed and its data draw share the offset of its model, except
# a shadow's split, shared by every arch and repeat trained on one dataset.
NULL_CONTROL, REFERENCE, SHADOW, VALIDATION = 1, 100, 200, 300
SHADOW_ARCH, REPEAT = 10, 1000  # a shadow's recipe: 200 + 10 dataset + arch + 1000 repeat; a target's 1000 repeat


def seed_offset(role: str, index: int = 0, arch: int = 0, repeat: int = 0) -> int:
    """The offset from the audit's seed of one model of the plan, or of one data draw (`role` "shadow_split",
    "validation"): target of training repeat `repeat` 1000 repeat (0 for the first), null control 1,
    reference `index` 100 + index, shadow of dataset `index`, arch
    `arch` and training repeat `repeat` 200 + 10 index + arch + 1000 repeat; the shadow split of dataset
    `index` 200 + index; the defenses' validation sample 300."""
    offsets = {"target": REPEAT * repeat, "null_control": NULL_CONTROL, "reference": REFERENCE + index,
               "shadow": SHADOW + SHADOW_ARCH * index + arch + REPEAT * repeat,
               "shadow_split": SHADOW + index, "validation": VALIDATION}  # fmt: skip
    return offsets[role]


def seeded_sample(frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """`n` rows of `frame` chosen with `seed`, in their original order."""
    if n >= frame.height:
        return frame
    return frame[np.sort(np.random.default_rng(seed).choice(frame.height, n, replace=False))]


@dataclass(frozen=True)
class TrainJob:
    """One model to train: its role, training records and recipe (a ClipTrainSpec or CaptionerSpec).
    A shadow model also names its known non-members, kept in `shadow_records` beside its members; a
    defended model its (defense, strength, base version) and, for early stopping, its validation records."""

    role: str
    train: pl.DataFrame
    spec: Any
    shadow_nonmembers: pl.DataFrame | None = None
    defense: tuple[str, float, str] | None = None
    validation: pl.DataFrame | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 of the recipe and the record ids (which hash image bytes and captions): the reuse key."""
        from m4i_assets.models.training import recipe

        held_out = [] if self.shadow_nonmembers is None else self.shadow_nonmembers["record_id"].to_list()
        # `recipe`: the spec without defense fields left off, so undefended fingerprints predate those fields
        payload = {"spec": recipe(self.spec), "records": self.train["record_id"].to_list()}
        if held_out:
            payload["shadow_nonmembers"] = held_out
        if self.validation is not None:
            payload["validation"] = self.validation["record_id"].to_list()
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def arguments(self, audit: str, staged: Path, device: str | None, threads: int | None) -> tuple:
        """The arguments of a family's `train_and_save` (plain values: they cross into worker processes)."""
        uris, captions = self.train["image_uri"].to_list(), self.train["caption"].to_list()
        validation = None
        if self.validation is not None:
            validation = (self.validation["image_uri"].to_list(), self.validation["caption"].to_list())
        return self.spec, uris, captions, staged, {"role": self.role, "audit": audit}, device, threads, validation


def reference_jobs(settings: Any, population: pl.DataFrame) -> list[TrainJob]:
    """`n_reference_models` reference CLIPs, each the target's recipe on a seeded half of the population."""
    return [TrainJob("reference", seeded_sample(population, population.height // 2,
                                                settings.seed + seed_offset("reference", r)),
                     settings.clip_train_spec(seed_offset("reference", r)))
            for r in range(settings.n_reference_models)]  # fmt: skip


def shadow_jobs(settings: Any, pools: list[pl.DataFrame], targets: dict[str, str] | None = None) -> list[TrainJob]:
    """Shadow captioners: per population dataset (`pools`, in order), arch of `shadow_archs` and training
    repeat, the arch's recipe on a seeded half of the dataset's population, the other half its known
    non-members. `targets` (arch -> directory) adds the architectures of audited targets that are built from their
    config (a user's Hugging Face captioner, `hf-<model_type>`: random init, the target's tokenizer), so that a
    user's captioner has an unrestricted scenario too."""
    own = {arch: {"config_dir": d} for arch, d in sorted((targets or {}).items()) if arch not in settings.shadow_archs}
    archs = [*((arch, None) for arch in settings.shadow_archs), *own.items()]
    jobs = []
    for d, pool in enumerate(pools):
        members, nonmembers = shadow_split(pool["record_id"].to_list(), settings.seed + seed_offset("shadow_split", d))
        for a, (arch, extra) in enumerate(archs):
            for repeat in range(settings.shadow_seeds):  # training variance: same data, another seed
                jobs.append(TrainJob("shadow", pool.filter(pl.col("record_id").is_in(members)),
                                     settings.captioner_spec(arch, seed_offset("shadow", d, a, repeat), extra),
                                     shadow_nonmembers=pool.filter(pl.col("record_id").is_in(nonmembers))))  # fmt: skip
    return jobs


def config_built_targets(storage: Home, audit: str, n: int) -> dict[str, str]:
    """arch -> checkpoint folder of the audit's `n` newest captioner targets whose architecture is built from
    their config (`hf-<model_type>`), for `shadow_jobs`."""
    repo = storage.repository
    infos = [repo.model_info(v) for v in repo.latest_versions(audit, "target", n, family="captioner")]
    return {i["arch"]: str(Path(i["checkpoint_uri"]).parent) for i in infos if i["arch"].startswith(HF_ARCH_PREFIX)}


def controlled_plan(family: Any, settings: Any, records: Callable[..., pl.DataFrame]) -> dict[str, list[TrainJob]]:
    """The training jobs of each training asset of `family` (a `Family`) in a controlled audit: the target on
    the members (`target_seeds` times, another seed each: training variance), the null control on as many
    population records of the main dataset (the same budget), and
    the helpers: reference CLIPs on that population, shadow captioners on it and on the second domain's.
    `records(roles, dataset=None)` reads the audit's records of some roles."""
    target, null_control, helpers = family.models
    population, members = records(("population",), dataset=settings.main_dataset()), records(("member",))
    null_train = seeded_sample(population, settings.n_members, settings.seed + seed_offset("null_control"))
    if family.helper_role == "reference":
        helper_jobs = reference_jobs(settings, population)
    else:
        second = settings.second_domain_spec()
        pools = [population, *([records(("population",), dataset=second.name)] if second else [])]
        helper_jobs = shadow_jobs(settings, pools)
    return {
        target: [
            TrainJob("target", members, family.base_spec(settings, seed_offset("target", repeat=r)))
            for r in range(settings.target_seeds)
        ],
        null_control: [TrainJob("null_control", null_train, family.base_spec(settings, seed_offset("null_control")))],
        helpers: helper_jobs,
    }


def adaptive_helper_jobs(family: Any, settings: Any, population: pl.DataFrame) -> list[TrainJob]:
    """The undefended helpers of `family` (a `Family`) that an adaptive attacker retrains with a defended
    version's defense (Tramer et al. 2020; Aerni et al., CCS 2024), as jobs of the undefended plan: every
    reference CLIP; the shadow captioners of the unrestricted scenario (the target's dataset, `population`, and
    arch: the scenario whose scores the audit reports)."""
    if family.helper_role == "reference":
        return reference_jobs(settings, population)
    arch = family.base_spec(settings).arch
    return [job for job in shadow_jobs(settings, [population]) if job.spec.arch == arch]


def validation_sample(settings: Any, population: pl.DataFrame) -> pl.DataFrame:
    """The population records early stopping validates on (never a candidate)."""
    return seeded_sample(population, settings.n_validation, settings.seed + seed_offset("validation"))


def find_reusable(storage: Home, audit: str, model_role: str, fingerprint: str) -> dict | None:
    """A registered model with this training fingerprint whose checkpoint is intact, if any."""
    for row in storage.repository.reusable_models(audit, model_role, fingerprint):
        if Path(row["checkpoint_uri"]).is_file() and sha256_file(row["checkpoint_uri"]) == row["sha256"]:
            return row
    return None


def train_and_register(
    jobs: list[TrainJob],
    family: ModuleType,
    settings: Any,
    storage: Home,
    register: Callable[[Path, str, dict], str],
    announce: Callable[[str, str], None],
    log: Callable[[str], None],
    device: str | None,
    workers: int,
) -> list[dict]:
    """Train models of one family (`models.clip` or `models.captioner`: a FAMILY name and a picklable
    `train_and_save`), save them and register each as a model version (`register(staged folder, sha256, models
    row)` returns its version), a shadow model's known members and non-members in `shadow_records`.

    A model whose fingerprint is registered with an intact checkpoint is reused (`announce(version, role)`), unless
    `settings.retrain`. With `workers` > 1 several models train at once in worker processes (spawned; one
    thread each on a CPU: `settings.train_threads`)."""
    results: list[dict | None] = [None] * len(jobs)
    todo: list[tuple[int, TrainJob, Path]] = []
    for i, job in enumerate(jobs):
        reusable = None if settings.retrain else find_reusable(storage, settings.audit, job.role, job.fingerprint)
        if reusable:
            announce(reusable["model_version"], job.role)
            log(f"{job.role}: reusing {reusable['model_version']} (same recipe and training records)")
            results[i] = {"model_version": reusable["model_version"], "sha256": reusable["sha256"], "reused": True}
        else:
            todo.append((i, job, Path(tempfile.mkdtemp(dir=storage.root))))

    threads = settings.train_threads  # the same threads in a worker as in process
    if min(len(todo), workers) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(family.train_and_save, *job.arguments(settings.audit, staged, device, threads))
                       for _, job, staged in todo]  # fmt: skip
            fitted = [f.result() for f in futures]
    else:
        fitted = [family.train_and_save(*job.arguments(settings.audit, staged, device, threads))
                  for _, job, staged in todo]  # fmt: skip

    for (i, job, staged), (sha, history, n_params, facts) in zip(todo, fitted):
        log(f"{job.role} {job.spec.arch}: {job.spec.epochs} epochs on {job.train.height} records, "
            f"final loss {history[-1]:.4f}")  # fmt: skip
        row = {"family": family.FAMILY, "arch": job.spec.arch, "role": job.role, "audit": settings.audit,
               "n_params": n_params, "train_config": json.dumps(asdict(job.spec)),
               "train_fingerprint": job.fingerprint,
               "train_dataset": ",".join(sorted(set(job.train["dataset"].to_list())))}  # fmt: skip
        if job.defense is not None:
            defense, strength, base = job.defense
            row |= {"defense": defense, "defense_strength": strength, "base_version": base,
                    "defense_facts": json.dumps(facts, default=str)}  # fmt: skip
        version = register(staged, sha, row)
        shutil.rmtree(staged, ignore_errors=True)
        results[i] = {"model_version": version, "sha256": sha, "final_loss": history[-1], "reused": False}
    for result, job in zip(results, jobs):
        if job.shadow_nonmembers is not None:
            known = pl.concat([job.train.select("record_id").with_columns(is_member=True),
                               job.shadow_nonmembers.select("record_id").with_columns(is_member=False)])  # fmt: skip
            storage.write("shadow_records", known, model_version=result["model_version"])
    return [{**r, "role": job.role, "arch": job.spec.arch, "n_train": job.train.height}
            for r, job in zip(results, jobs)]  # fmt: skip
