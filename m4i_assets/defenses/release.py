"""Release-time defenses: output perturbation of what a trained model releases, with no retraining.

Each one degrades the signal a membership-inference attack reads from the model's outputs, at some
cost in utility that `m4i_assets.metrics.utility` measures; they carry over to multi-modal models the
output-side mitigations of Shokri et al. (S&P 2017: coarser precision of released scores, higher
entropy of the released distribution) and output perturbation in general (e.g. Jia et al. 2019, MemGuard):

- `noisy_embeddings`: Gaussian noise on released CLIP embeddings, re-normalised to unit length.
- `round_similarities`: released similarity scores rounded to a few decimals.
- sampled decoding (temperature, top-k; `models.captioner.sample_next_token`) for captioners instead of greedy.

`RELEASE_DEFENSES` names them and says what each one's `strength` parameter is. Everything is
deterministic given a seed (or a seeded `torch.Generator`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from m4i_assets.families import FAMILIES

Interface = Literal["embeddings", "similarities", "likelihoods", "captions"]
INTERFACES: dict[str, str] = {
    "embeddings": "the L2-normalised image and text embeddings of any query (and so every similarity)",
    "similarities": "only the image-text similarity score of a queried (image, caption) pair",
    "likelihoods": "the generated caption of a queried image and the model's likelihood of any (image, caption) "
    "pair (white box)",
    "captions": "only the generated caption of a queried image (black box, Hu et al. 2022 section 3)",
}
"""What an attacker can query of a model version, from most to least within a family: the defense applies at
this interface."""
PROVIDES: dict[Interface, frozenset[str]] = {
    "embeddings": frozenset({"embeddings", "similarities"}),
    "similarities": frozenset({"similarities"}),
    "likelihoods": frozenset({"likelihoods", "captions"}),
    "captions": frozenset({"captions"}),
}
"""What each interface gives an attacker: itself and every interface below it."""
ATTACK_NEEDS: dict[str, Interface] = {"wsa": "embeddings", "m4i_loss": "likelihoods", "m4i_loss_ref": "likelihoods"}
"""Attacks that need more than the narrowest interface of their family: WSA's MLP reads the embeddings
themselves (Ko et al. 2023, 3.4); the loss attacks read the captioner's likelihood of the reference caption
(`attacks.caption_loss`), which a captions-only release (sampled decoding) does not give. Every other CLIP
attack needs similarity scores of chosen pairs only (AEA's augmented queries, clip_loss's negatives and the
calibrated attacks' references included), and the M^4I attacks need captions."""


def family_attacks_needing(family: str) -> list[str]:
    """The attacks of `ATTACK_NEEDS` that apply to a family (its default interface gives what they need)."""
    return [a for a, needs in ATTACK_NEEDS.items() if needs in PROVIDES[FAMILIES[family].interface]]


def interface_of(family: str, defense: str | None) -> Interface:
    """What a model version releases: its release-time defense's interface (the defense applies there), else
    the family's default (a CLIP's embeddings, a captioner's captions)."""
    if defense in RELEASE_DEFENSES:
        return RELEASE_DEFENSES[defense].interface
    return FAMILIES[family].interface


def attack_skip_reason(attack: str, interface: Interface) -> str | None:
    """Why an attack cannot run against a release of `interface` (None when it can)."""
    needs = ATTACK_NEEDS.get(attack)
    if needs is None or needs in PROVIDES[interface]:
        return None
    return f"{attack} needs {needs} ({INTERFACES[needs]}); this version releases {interface} only"


@dataclass(frozen=True)
class ReleaseDefense:
    """Metadata of one release-time defense: the model family it applies to, the interface it perturbs (what
    the defended model releases), whether it draws randomness (so an attacker gains by asking again), the
    name of its strength parameter, the strength that means "no defense", which direction is stronger, and a
    description."""

    applies_to: Literal["clip", "captioner"]
    interface: Interface
    randomized: bool
    strength: str
    off: float | None
    stronger: Literal["larger", "smaller"]
    description: str


RELEASE_DEFENSES: dict[str, ReleaseDefense] = {
    "embedding_noise": ReleaseDefense(
        applies_to="clip",
        interface="embeddings",
        randomized=True,
        strength="sigma",
        off=0.0,
        stronger="larger",
        description="Gaussian noise N(0, sigma^2) added to each coordinate of the released L2-normalised image "
        "and text embeddings, then re-normalised to unit length (`noisy_embeddings`).",
    ),
    "similarity_rounding": ReleaseDefense(
        applies_to="clip",
        interface="similarities",
        randomized=False,
        strength="decimals",
        off=None,
        stronger="smaller",
        description="Released image-text cosine similarities rounded to `decimals` decimal places "
        "(`round_similarities`); no rounding is no defense.",
    ),
    "sampled_decoding": ReleaseDefense(
        applies_to="captioner",
        interface="captions",
        randomized=True,
        strength="temperature",
        off=0.0,
        stronger="larger",
        description="Captions decoded by sampling from softmax(logits / temperature) over the top 10 tokens "
        "(`models.captioner.SAMPLED_DECODING_TOP_K`, which a test holds to this text) instead of greedily; "
        "temperature 0 is greedy (`sample_next_token`).",
    ),
}


def _key_rng(seed: int, key: str) -> np.random.Generator:
    """A generator seeded by (seed, sha256 of the key): the same record always gets the same stream."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return np.random.default_rng(np.random.SeedSequence([seed, int.from_bytes(digest, "big")]))


def noisy_embeddings(emb: np.ndarray, sigma: float, seed: int, keys: Sequence[str] | None = None) -> np.ndarray:
    """Gaussian output perturbation of released embeddings, re-normalised to unit length.

    `emb` is (n, d), rows L2-normalised (as CLIP releases them). Every coordinate gets independent
    N(0, sigma^2) noise, then every row is scaled back to unit length, so the released embedding is
    still a unit vector as CLIP users expect. Returns float32 (n, d); `sigma = 0` returns an unchanged
    copy.

    Which noise a row gets:

    - `keys=None`: one `np.random.default_rng(seed)` draws the (n, d) noise in row order. Simple, but a
      record's noise then depends on its position, so embedding it in another batch or order releases
      a different vector.
    - `keys` given (one string per row, e.g. record ids): row i's noise comes from its own generator
      seeded by (seed, sha256 of keys[i]), so a record's released embedding depends only on its
      embedding, the key, sigma and the seed, not on which other records were released with it
      (re-releasing it cannot average the noise away). Rows with equal keys get equal noise.

    Use different seeds for the image side and the text side of the same records: with the same seed
    and keys both would get the same noise vector, which correlates them.
    """
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"emb must be a 2-d (n, d) array, got shape {emb.shape}")
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if keys is not None:
        if isinstance(keys, str):
            raise ValueError("keys must be a sequence of strings (one per row), not a string")
        if len(keys) != emb.shape[0]:
            raise ValueError(f"keys must have one entry per row: got {len(keys)} keys for {emb.shape[0]} rows")
    if sigma == 0:
        return emb.astype(np.float32, copy=True)
    n, d = emb.shape
    if keys is None:
        noise = np.random.default_rng(seed).standard_normal((n, d))
    else:
        noise = np.empty((n, d), dtype=np.float64)
        for i, key in enumerate(keys):
            noise[i] = _key_rng(seed, str(key)).standard_normal(d)
    out = emb.astype(np.float64) + sigma * noise
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, np.finfo(np.float64).tiny)).astype(np.float32)


def round_similarities(sim: np.ndarray, decimals: int) -> np.ndarray:
    """Released similarity scores rounded to `decimals` decimal places (`np.round`: halves to even).

    The "rounding of similarities" output-perturbation defense: an attack thresholding or comparing
    scores sees only coarse values, and close scores tie. Same shape and dtype as `sim`; raises
    ValueError when `decimals` < 0.
    """
    if isinstance(decimals, bool) or int(decimals) != decimals or decimals < 0:
        raise ValueError(f"decimals must be an integer >= 0, got {decimals!r}")
    return np.round(np.asarray(sim), int(decimals))


@dataclass(frozen=True)
class Release:
    """What a model version releases: its release-time defense (None: the raw outputs) and strength.

    The signal assets pass every output through it, so every attack sees exactly what the defended
    release exposes: embeddings with keyed noise (image and text sides on separate streams, an
    augmented query keyed by its transform as well), similarities rounded, captions sampled."""

    defense: str | None = None
    strength: float | None = None
    seed: int = 0
    queries: int = 1
    """How many variants of each query the attacker sends and averages (1: the naive attacker; more: the
    adaptive one, Tramer et al. 2020, against a randomized release)."""

    def __post_init__(self) -> None:
        if self.defense is not None and self.defense not in RELEASE_DEFENSES:
            raise ValueError(f"unknown release defense {self.defense!r}; known: {sorted(RELEASE_DEFENSES)}")
        if self.queries < 1:
            raise ValueError(f"queries must be >= 1, got {self.queries}")

    def embeddings(
        self, emb: np.ndarray, keys: Sequence[str], side: str, variants: Sequence[Sequence[str]] = ()
    ) -> np.ndarray:
        """Released embeddings of one side (`image` or `text`), one key per row (record id, or id/transform).

        `variants` are the keys of the attacker's other queries of the same rows (`queries - 1` lists, e.g. the
        content hashes of re-encoded images or respaced captions, `m4i_assets.attacks.adaptive`): each is
        released with its own noise and the attacker sees the average of all `queries` releases."""
        if self.defense != "embedding_noise":
            return emb
        from m4i_assets.attacks.adaptive import average_releases

        if len(variants) != self.queries - 1:
            raise ValueError(f"{self.queries} queries need {self.queries - 1} variant key lists, got {len(variants)}")
        releases = [noisy_embeddings(emb, float(self.strength), self.seed, [f"{side}:{k}" for k in ks])
                    for ks in (keys, *variants)]  # fmt: skip
        return releases[0] if len(releases) == 1 else average_releases(releases)

    def similarities(self, sim: np.ndarray) -> np.ndarray:
        """Released similarity scores."""
        if self.defense != "similarity_rounding":
            return sim
        return round_similarities(sim, int(self.strength))

    def decoding_draws(self, keys: Sequence[str], steps: int) -> np.ndarray:
        """The draws of sampled decoding, (len(keys), steps) in [0, 1): query i's from its own generator seeded by
        (seed, sha256 of keys[i]), keys being the content hashes of the queried images
        (`attacks.adaptive.query_key`), so asking the same image again gets the same caption, and a re-encoded
        image another one (the adaptive attacker's k queries, `attacks.adaptive.average_caption_metrics`)."""
        return np.stack([_key_rng(self.seed, f"caption:{k}").random(steps) for k in keys]) if len(keys) else (
            np.zeros((0, steps)))  # fmt: skip

    @property
    def temperature(self) -> float:
        """The decoding temperature of released captions (0: greedy)."""
        return float(self.strength) if self.defense == "sampled_decoding" else 0.0
