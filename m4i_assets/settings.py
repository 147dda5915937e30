"""Audit settings and named profiles: one place where every size, seed and hyper-parameter lives.

`default` is the embedded controlled audit `make demo` runs; `tiny` is the same graph at toy scale
for tests. A profile is picked by `M4I_PROFILE` (see `definitions.py`) and every field can still be
overridden per run in the Dagster launchpad, since `AuditSettings` is a Dagster resource.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import ConfigurableResource

if TYPE_CHECKING:  # the model adapters import torch: load them only where training happens
    from m4i_assets.attacks.m4i import MfeSpec
    from m4i_assets.models.captioner import CaptionerSpec
    from m4i_assets.models.clip import ClipTrainSpec

from m4i_assets.data.audits import AuditSpec, load_audits
from m4i_assets.data.corpus import CorpusSpec
from m4i_assets.data.roles import RoleSpec


class AuditSettings(ConfigurableResource):
    """Everything that decides an audit's numbers. Same settings, same numbers."""

    audit: str = "default"
    seed: int = 0
    # Embedded corpus
    corpus_records: int = 3000
    corpus_image_size: int = 64
    corpus_style: str = "default"
    corpus_name: str = "synthetic_shapes"  # its `records.dataset`; a profile of another size needs its own
    # Draw the non-members from a deliberately different distribution (the `shifted` corpus style),
    # to see the blind-baseline shift gate fire.
    shifted_nonmembers: bool = False
    # A second caption domain (the `sketch` style: its own images, vocabulary and phrasing), all of it
    # population, for the data-restricted shadow captioners of the M^4I audit; 0 turns it off.
    second_domain_records: int = 1000
    # Users' data sources: a registry file (see `m4i_assets.data.sources`; empty = `$M4I_HOME/datasets.yaml`),
    # and the dataset the audit draws its members, non-members and population from (empty = the embedded
    # corpus above).
    dataset_registry: str = ""
    audit_dataset: str = ""
    # The audit registry (`m4i_assets.data.audits`; empty = `$M4I_HOME/audits.yaml`). When `audit` names one
    # of its entries, the audit is labelled or unlabelled: roles from the data, the user's checkpoints.
    audit_registry: str = ""
    # Roles
    n_members: int = 500
    # 1000 non-members, so that TPR at 1% FPR rests on ten possible false positives (README, Rules of evidence)
    n_nonmembers: int = 1000
    n_known_nonmembers: int = 500
    # CLIP training (target and null control share it; the null control trains on an equally large
    # sample of the population)
    clip_arch: str = "m4i-tiny-vit"
    clip_epochs: int = 40
    clip_batch_size: int = 64
    clip_lr: float = 1e-3
    retrain: bool = False  # train again even when an identical model (recipe, records) is registered
    # Captioners (M^4I): target and null control have `captioner_arch`; one shadow per (population
    # dataset, arch in `shadow_archs`) trains on a seeded half of that dataset's population, the other half
    # being its known non-members.
    captioner_arch: str = "cnn-lstm"
    shadow_archs: list[str] = ["cnn-lstm", "vit-gpt2"]
    captioner_image_size: int = 32
    captioner_max_len: int = 50  # the embedded corpus's longest caption has 50 words
    captioner_epochs: int = 30
    captioner_batch_size: int = 64
    captioner_lr: float = 2e-3
    caption_batch_size: int = 256
    caption_metrics: list[str] = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "cider"]
    mb_classifiers: list[str] = ["svm"]  # the paper's code: a linear SVM with C = 1e5
    mb_svm_c: float = 1e5
    fb_classifiers: list[str] = ["logreg", "mlp"]  # chosen on a shadow validation split
    mfe_dim: int = 256
    mfe_epochs: int = 20
    # Defenses (README, Defenses): strengths per defense for the defended versions of each family's
    # target (`m4i_assets.defenses.grid`); DP-SGD's clipping norm and delta; early stopping's validation
    # records, drawn from the population (never a candidate).
    clip_defenses: dict[str, list[float]] = {
        "dp_sgd": [0.0, 0.5, 1.0, 2.0], "augmentation": [0.5], "weight_decay": [0.5], "early_stopping": [3],
        "embedding_noise": [0.02, 0.05, 0.1], "similarity_rounding": [2],
    }  # fmt: skip
    captioner_defenses: dict[str, list[float]] = {"dp_sgd": [0.0, 0.5, 1.0, 2.0], "sampled_decoding": [0.7, 1.0]}
    # variant queries the adaptive attacker averages against a randomized release (embedding noise, sampled
    # decoding; 1: none)
    adaptive_queries: int = 8
    # Training-time defenses whose adaptive attacker gets helpers trained with the same defense and strength (a pair
    # of a family's grid only): `n_reference_models` reference CLIPs, or the unrestricted scenario's shadow
    # captioners (`shadow_seeds` of them)
    adaptive_references: dict[str, list[float]] = {"dp_sgd": [1.0], "augmentation": [0.5]}
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    n_validation: int = 100
    # Attacks
    # No default below was chosen by looking at the candidates' labels (README, Rules of evidence): each is a
    # paper's value or a rule fixed on the known non-members (README, "Choices where the papers are silent").
    n_reference_models: int = 4  # reference CLIPs for the calibrated attacks, each on half the population
    aea_aggregation: str = "known_zscore"  # mean | known_zscore | known_lr (`attacks.aea`)
    wsa_tau_rule: str = "quantile"  # tau = the known non-members' (1 - wsa_alpha) CS quantile; or "gaussian"
    wsa_alpha: float = 0.05
    wsa_lambda: float = 1.5  # the paper's, for the "gaussian" rule: mean + lambda * std
    wsa_min_pseudo_members: int = 20  # below this, the top-CS candidates are taken (recorded as rule top_k)
    wsa_folds: int = 5  # cross-fitting: each candidate scored by an MLP fit on the other folds
    wsa_features: list[str] = ["concat"]  # the paper's; also "product", "cs", "deltas" (`attacks.wsa`)
    clip_loss_logit_scale: float = 0.0  # 0: the model's own logit scale; else this fixed value (e.g. 10)
    rmia_a: float = 0.3  # offline RMIA's Pr_IN approximation (Zarifzadeh et al. 2024's default)
    blind_folds: int = 5
    # The shift gate fails when the blind baseline's AUC CI (or that of known vs candidate non-members)
    # lies above 0.5 by more than this (below chance is small-sample bias, reported only).
    shift_gate_margin: float = 0.10
    # Unlabelled audits: the known non-members' false-positive rate at the membership-rate threshold
    membership_rate_alpha: float = 0.05
    # Signals and evaluation
    embed_batch_size: int = 256
    # Record shards of each audited version's model-forward signals (`Family.sharded`): each shard is a partition,
    # computed by a run of its own (on any worker); the numbers do not depend on it. Fixed when the definitions
    # load (its partitions), so set it in the profile or M4I_SETTINGS, not in a run's config.
    record_shards: int = 1
    n_bootstrap: int = 1000
    n_permutations: int = 1000  # label-permutation test of the target's best attack
    # Training variance: every shadow captioner is trained with this many seeds (the scenario table gives
    # the mean and spread over them); 1 = spread unmeasured.
    shadow_seeds: int = 1
    # ... and the target of a controlled audit (the demo audits every one; the headline gives the mean and
    # spread of each attack's figures over them); 1 = spread unmeasured.
    target_seeds: int = 1
    # Torch threads of every training run (in process or in a worker), so a checkpoint's bytes do not
    # depend on the host's cores or on where it trained.
    train_threads: int = 1

    def corpus_spec(self) -> CorpusSpec:
        return CorpusSpec(
            n_records=self.corpus_records,
            image_size=self.corpus_image_size,
            seed=self.seed,
            style=self.corpus_style,
            name=self.corpus_name,
        )

    def shifted_corpus_spec(self) -> CorpusSpec | None:
        """The corpus the non-members come from when `shifted_nonmembers` is on (else None)."""
        if not self.shifted_nonmembers:
            return None
        return CorpusSpec(
            n_records=self.n_nonmembers,
            image_size=self.corpus_image_size,
            seed=self.seed + 1,
            style="shifted",
            name="synthetic_shapes_shifted",
        )

    def second_domain_spec(self) -> CorpusSpec | None:
        """The second caption domain (all population, for data-restricted shadows), or None."""
        if not self.second_domain_records:
            return None
        return CorpusSpec(
            n_records=self.second_domain_records,
            image_size=self.corpus_image_size,
            seed=self.seed + 2,
            style="sketch",
            name="synthetic_sketches",
        )

    def corpus_specs(self) -> list[CorpusSpec]:
        specs = (self.corpus_spec(), self.shifted_corpus_spec(), self.second_domain_spec())
        return [spec for spec in specs if spec is not None]

    def registry_path(self, home: Path) -> Path:
        """The dataset registry file: `dataset_registry`, else `datasets.yaml` in the platform's home."""
        return Path(self.dataset_registry) if self.dataset_registry else home / "datasets.yaml"

    def audit_registry_path(self, home: Path) -> Path:
        """The audit registry file: `audit_registry`, else `audits.yaml` in the platform's home."""
        return Path(self.audit_registry) if self.audit_registry else home / "audits.yaml"

    def registered_audit(self, home: Path) -> AuditSpec | None:
        """The registry entry of this audit, or None for a controlled audit (no entry of that name)."""
        return next((a for a in load_audits(self.audit_registry_path(home)) if a.name == self.audit), None)

    def reference_count(self, home: Path) -> int:
        """How many reference models the audit calibrates against: all those an audit of the registry names, a
        controlled audit's `n_reference_models`."""
        audit = self.registered_audit(home)
        return len(audit.references) if audit is not None else self.n_reference_models

    def main_dataset(self) -> str:
        """The dataset the audit's roles are drawn from."""
        return self.audit_dataset or self.corpus_spec().name

    def role_spec(self) -> RoleSpec:
        return RoleSpec(self.n_members, self.n_nonmembers, self.n_known_nonmembers, seed=self.seed)

    def clip_train_spec(self, seed_offset: int = 0) -> ClipTrainSpec:
        from m4i_assets.models.clip import ClipTrainSpec

        return ClipTrainSpec(
            arch=self.clip_arch,
            epochs=self.clip_epochs,
            batch_size=self.clip_batch_size,
            lr=self.clip_lr,
            seed=self.seed + seed_offset,
        )

    def captioner_spec(self, arch: str, seed_offset: int = 0, extra: dict | None = None) -> CaptionerSpec:
        """The audit's captioner recipe for `arch` (`extra`: what the arch reads beyond it, e.g. the `config_dir` of
        an `hf-<model_type>` shadow)."""
        from m4i_assets.models.captioner import CaptionerSpec

        return CaptionerSpec(
            arch=arch,
            extra=extra or {},
            image_size=self.captioner_image_size,
            max_len=self.captioner_max_len,
            epochs=self.captioner_epochs,
            batch_size=self.captioner_batch_size,
            lr=self.captioner_lr,
            seed=self.seed + seed_offset,
        )

    def mfe_spec(self) -> MfeSpec:
        from m4i_assets.attacks.m4i import MfeSpec

        return MfeSpec(dim=self.mfe_dim, image_size=self.captioner_image_size, epochs=self.mfe_epochs, seed=self.seed)


PROFILES: dict[str, dict] = {
    "default": {},  # the demo: 500 members, 1000 non-members, 500 known non-members, 1000 population records
    # `make demo-defenses`: both families' defenses on 2 cores: an 1800-record corpus of its own (its own
    # audit too, beside a home's default one), 200 members and known non-members, 1000 non-members (so that
    # TPR@1%FPR rests on ten possible false positives, the rules of evidence: the training sets, and so the
    # training time, stay those of 200 members and a 400-record population), two reference CLIPs, one shadow
    # captioner (unrestricted scenario), and a reduced grid: no clipping-only DP-SGD (noise 0: no privacy, epsilon
    # infinite) and no embedding noise at 0.02 (a naive TPR of 0.845 against 0.870 undefended, the previous table),
    # so that the adaptive attackers' extra models and audits (2 defended reference CLIPs each for DP-SGD at 1 and
    # augmentation at 0.5, a DP-SGD shadow captioner at 1, a k-query twin per randomized release) fit 2 cores.
    "defenses": {
        "audit": "defenses",
        "corpus_records": 1800,
        "corpus_name": "synthetic_shapes_1800",
        "n_members": 200,
        "n_nonmembers": 1000,
        "n_known_nonmembers": 200,
        "n_reference_models": 2,
        "second_domain_records": 0,
        "shadow_archs": ["cnn-lstm"],
        "n_bootstrap": 300,
        "clip_defenses": {
            "dp_sgd": [0.5, 1.0, 2.0],
            "augmentation": [0.5],
            "weight_decay": [0.5],
            "early_stopping": [3],
            "embedding_noise": [0.05, 0.1],
            "similarity_rounding": [2],
        },
        # DP-SGD costs the captioner 5x per epoch (per-sample gradients through the LSTM): two noise levels here
        "captioner_defenses": {"dp_sgd": [1.0, 4.0], "sampled_decoding": [0.7, 1.0]},
    },
    "tiny": {
        "audit": "tiny",
        "corpus_records": 240,
        "adaptive_queries": 2,
        "n_reference_models": 2,
        "corpus_image_size": 32,
        "n_members": 48,
        "n_nonmembers": 48,
        "n_known_nonmembers": 48,
        "clip_epochs": 3,
        "clip_batch_size": 16,
        "embed_batch_size": 32,
        "n_bootstrap": 100,
        "second_domain_records": 96,
        "captioner_epochs": 4,
        "captioner_batch_size": 16,
        "caption_batch_size": 32,
        "mfe_epochs": 3,
    },
}


def settings_for(profile: str | None = None) -> AuditSettings:
    """The settings of a named profile (default: `$M4I_PROFILE`, else `default`), with the fields of the
    JSON object in `$M4I_SETTINGS` on top (e.g. `{"captioner_arch": "vit-gpt2"}`)."""
    name = profile or os.environ.get("M4I_PROFILE", "default")
    if name not in PROFILES:
        raise ValueError(f"unknown M4I profile {name!r}; known: {sorted(PROFILES)}")
    try:
        overrides = json.loads(os.environ.get("M4I_SETTINGS") or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"M4I_SETTINGS is not JSON: {exc}") from exc
    if not isinstance(overrides, dict):
        raise ValueError("M4I_SETTINGS must be a JSON object of AuditSettings fields")
    unknown = sorted(set(overrides) - set(AuditSettings.model_fields))
    if unknown:
        raise ValueError(f"M4I_SETTINGS names unknown settings {unknown}")
    return AuditSettings(**{**PROFILES[name], **overrides})


def m4i_home() -> Path:
    """Where the platform writes everything: `$M4I_HOME`, default `.m4i/` in the working directory."""
    return Path(os.environ.get("M4I_HOME", ".m4i")).resolve()
