"""The defense grid: every defense the platform evaluates, what its strength means, and how a
training-time defense switches on in a model's training recipe (README, Defenses).

Training-time defenses retrain the target with the same training code and one spec field changed;
release-time defenses (`release.RELEASE_DEFENSES`) keep the target's checkpoint and perturb what it
releases. A defended version is named by (defense, strength) and compared with the undefended target.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from m4i_assets.defenses.release import RELEASE_DEFENSES

# defense -> (spec field it sets, what the strength is)
TRAINING_DEFENSES: dict[str, tuple[str, str]] = {
    "dp_sgd": ("dp_noise_multiplier", "noise multiplier of DP-SGD (per-sample clipping; 0 = clipping, no noise)"),
    "augmentation": ("augment", "training-time image augmentation strength in [0, 1]"),
    "weight_decay": ("weight_decay", "AdamW weight decay"),
    "early_stopping": ("early_stopping_patience", "epochs without validation improvement before stopping"),
}
DEFENSES = (*TRAINING_DEFENSES, *RELEASE_DEFENSES)


def is_release(defense: str) -> bool:
    """Whether a defense perturbs releases (no retraining) rather than training."""
    if defense not in DEFENSES:
        raise ValueError(f"unknown defense {defense!r}; known: {', '.join(DEFENSES)}")
    return defense in RELEASE_DEFENSES


def defended_spec(spec: Any, defense: str, strength: float) -> Any:
    """The training recipe `spec` (ClipTrainSpec or CaptionerSpec) with one training-time defense on."""
    if is_release(defense):
        raise ValueError(f"{defense} is a release-time defense: it does not change the training recipe")
    name = TRAINING_DEFENSES[defense][0]
    if name not in {f.name for f in fields(spec)}:
        raise ValueError(f"{type(spec).__name__} has no field {name!r} for the {defense} defense")
    value = int(strength) if name == "early_stopping_patience" else float(strength)
    return replace(spec, **{name: value})


def grid(defenses: dict[str, list[float]], family: str) -> list[tuple[str, float]]:
    """(defense, strength) pairs of a family's grid, in a stable order; a clear error for a defense that does
    not apply to the family (sampled decoding is for captioners, embedding noise and rounding for CLIPs)."""
    pairs = []
    for defense in sorted(defenses):
        if is_release(defense) and RELEASE_DEFENSES[defense].applies_to != family:
            raise ValueError(f"{defense} applies to {RELEASE_DEFENSES[defense].applies_to} models, not {family}")
        pairs += [(defense, float(s)) for s in sorted(defenses[defense])]
    return pairs


def release_version(base_version: str, defense: str, strength: float, queries: int = 1) -> str:
    """The model version of a release-time defense of `base_version` (same checkpoint, other outputs); with
    `queries` > 1, the release as the adaptive attacker who averages that many variant queries sees it."""
    version = f"{base_version}+{defense}={strength:g}"
    return version if queries == 1 else f"{version}+k={queries}"
