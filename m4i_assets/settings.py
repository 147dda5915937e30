"""Audit settings and named profiles: one place where every size, seed and hyper-parameter lives.

`default` is the embedded controlled audit `make demo` runs; `tiny` is the same graph at toy scale
for tests. A profile is picked by `M4I_PROFILE` (see `definitions.py`) and every field can still be
overridden per run in the Dagster launchpad, since `AuditSettings` is a Dagster resource.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource

from m4i_assets.data.corpus import CorpusSpec
from m4i_assets.data.roles import RoleSpec
from m4i_assets.models.clip import ClipTrainSpec


class AuditSettings(ConfigurableResource):
    """Everything that decides an audit's numbers. Same settings, same numbers."""

    audit: str = "default"
    seed: int = 0
    # Embedded corpus
    corpus_records: int = 3000
    corpus_image_size: int = 64
    corpus_style: str = "default"
    # Roles
    n_members: int = 500
    n_nonmembers: int = 500
    n_known_nonmembers: int = 500
    # CLIP training (target and null control share it; the null control trains on an equally large
    # sample of the population)
    clip_arch: str = "m4i-tiny-vit"
    clip_epochs: int = 40
    clip_batch_size: int = 64
    clip_lr: float = 1e-3
    # Signals and evaluation
    embed_batch_size: int = 256
    embed_num_workers: int = 2
    n_bootstrap: int = 1000

    def corpus_spec(self) -> CorpusSpec:
        return CorpusSpec(
            n_records=self.corpus_records, image_size=self.corpus_image_size, seed=self.seed, style=self.corpus_style
        )

    def role_spec(self) -> RoleSpec:
        return RoleSpec(self.n_members, self.n_nonmembers, self.n_known_nonmembers, seed=self.seed)

    def clip_train_spec(self, seed_offset: int = 0) -> ClipTrainSpec:
        return ClipTrainSpec(
            arch=self.clip_arch,
            epochs=self.clip_epochs,
            batch_size=self.clip_batch_size,
            lr=self.clip_lr,
            seed=self.seed + seed_offset,
        )


PROFILES: dict[str, dict] = {
    "default": {},
    "tiny": {
        "audit": "tiny",
        "corpus_records": 240,
        "corpus_image_size": 32,
        "n_members": 48,
        "n_nonmembers": 48,
        "n_known_nonmembers": 48,
        "clip_epochs": 3,
        "clip_batch_size": 16,
        "embed_batch_size": 32,
        "embed_num_workers": 0,
        "n_bootstrap": 100,
    },
}


def settings_for(profile: str | None = None) -> AuditSettings:
    """The settings of a named profile (default: `$M4I_PROFILE`, else `default`)."""
    name = profile or os.environ.get("M4I_PROFILE", "default")
    if name not in PROFILES:
        raise ValueError(f"unknown M4I profile {name!r}; known: {sorted(PROFILES)}")
    return AuditSettings(**PROFILES[name])


def m4i_home() -> Path:
    """Where the platform writes everything: `$M4I_HOME`, default `.m4i/` in the working directory."""
    return Path(os.environ.get("M4I_HOME", ".m4i")).resolve()
