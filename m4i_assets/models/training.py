"""Training-time defenses, the hooks of the one training loop: the recipe (`TrainingDefense`) and the regularisers
that need no privacy accounting (DP-SGD is `models.dp`). They live with the models that train with them, below
`defenses/` (the grids and release-time defenses), so the layers only point down.

A defended model version is an ordinary model version: the same training code (`models.clip.train_clip`,
`models.captioner.train_captioner`) with a defense switched on by its spec's fields, saved and loaded as any
other checkpoint of its architecture, so the whole audit runs on it unchanged.

The fields (`DEFENSE_FIELDS` of `TrainingDefense`, which ClipTrainSpec and CaptionerSpec inherit, every default
"off"): DP-SGD's
`dp_noise_multiplier`, `dp_max_grad_norm`, `dp_delta` (`models.dp`), `augment`, `early_stopping_patience`,
`validation_fraction`; weight decay is the specs' own `weight_decay`. `TrainingDefense.of(spec)` reads and
checks them. An undefended spec trains exactly as before, to the same checkpoint bytes; `recipe(spec)` is
`asdict(spec)` without the defense fields that are at their defaults, i.e. the dict an undefended spec had
before these fields existed (a training fingerprint built on it does not change for existing recipes).

The regularisers:
- `augment` (strength a in [0, 1]): per-image random resized crop (area scale in [1 - 0.6 a, 1], aspect ratio
  in [3/4, 4/3]) and colour jitter (brightness, contrast, saturation factors in [1 - 0.4 a, 1 + 0.4 a], hue
  shift in [-0.05 a, 0.05 a]), applied to the [0, 1] image tensor before the model's normalisation, with
  parameters drawn from a generator seeded from the spec's seed. No horizontal flips by default
  (`augmenter(flip=True)` has them): the corpus's captions name sides ("upper left") and colours, so flips
  (and large hue shifts) would teach wrong pairs. The ops are torchvision.transforms.v2's, as in
  `signals.augmentations` (there with fixed parameters for AEA, here random per image).
- Early stopping (`early_stopping_patience` > 0): the validation loss is computed after every epoch, training
  stops when it has not improved for `patience` epochs and the best epoch's weights are restored. The
  validation pairs are either given to the trainer (`validation=(uris, captions)`, e.g. population records,
  so every member is trained on) or a seeded `validation_fraction` of the training pairs, which are then
  not trained on (the facts' `validation_indices` name them, as positions in the given lists).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as T


@dataclass(frozen=True)
class TrainingDefense:
    """A spec's training-time defense fields; every default means "off".

    dp_noise_multiplier: None = no DP-SGD; 0.0 = DP-SGD's per-sample clipping and Poisson sampling without noise
    (the grid's "no noise" point, epsilon infinite); > 0 = DP-SGD with that noise multiplier (sigma).
    dp_max_grad_norm: the per-sample clipping norm C. dp_delta: the delta epsilon is reported at.
    augment: training-time augmentation strength in [0, 1].
    early_stopping_patience: epochs without validation improvement before stopping (0 = never stop).
    validation_fraction: share of the training pairs held out as the validation split (0 = none)."""

    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    augment: float = 0.0
    early_stopping_patience: int = 0
    validation_fraction: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.dp_noise_multiplier is not None and not self.dp_noise_multiplier >= 0:
            problems.append(f"dp_noise_multiplier {self.dp_noise_multiplier} must be None or >= 0")
        if not self.dp_max_grad_norm > 0:
            problems.append(f"dp_max_grad_norm {self.dp_max_grad_norm} must be > 0")
        if not 0 < self.dp_delta < 1:
            problems.append(f"dp_delta {self.dp_delta} must be in (0, 1)")
        if not 0 <= self.augment <= 1:
            problems.append(f"augment {self.augment} must be in [0, 1]")
        if self.early_stopping_patience < 0:
            problems.append(f"early_stopping_patience {self.early_stopping_patience} must be >= 0")
        if not 0 <= self.validation_fraction < 1:
            problems.append(f"validation_fraction {self.validation_fraction} must be in [0, 1)")
        if problems:
            raise ValueError("bad training defense: " + "; ".join(problems))

    @classmethod
    def of(cls, spec: Any) -> TrainingDefense:
        """The defense fields of a ClipTrainSpec or CaptionerSpec (checked: a ValueError names bad values)."""
        return cls(**{name: getattr(spec, name) for name in DEFENSE_FIELDS})

    @property
    def dp(self) -> bool:
        return self.dp_noise_multiplier is not None

    @property
    def defense(self) -> TrainingDefense:
        """The defense fields alone (a training spec inherits them: ClipTrainSpec, CaptionerSpec)."""
        return TrainingDefense.of(self)

    @property
    def active(self) -> bool:
        return bool(self.changed())

    def changed(self) -> dict[str, Any]:
        """The defense fields that differ from their defaults ("off")."""
        off = TrainingDefense()
        return {k: getattr(self, k) for k in DEFENSE_FIELDS if getattr(self, k) != getattr(off, k)}


DEFENSE_FIELDS = tuple(f.name for f in fields(TrainingDefense))
OFF = TrainingDefense()


def recipe(spec: Any) -> dict[str, Any]:
    """`asdict(spec)` without the defense fields left at their defaults: for an undefended spec, the dict it
    had before the defense fields existed (what a fingerprint of existing recipes should hash)."""
    return {k: v for k, v in asdict(spec).items() if not (k in DEFENSE_FIELDS and v == getattr(OFF, k))}


def split_pairs(
    image_uris: list[str], captions: list[str], validation: tuple[list[str], list[str]] | None, spec: Any
) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
    """(all image uris, all captions, train positions, validation positions) of a training run: the given
    `validation` pairs appended after the training pairs, or a seeded `spec.validation_fraction` of the
    training pairs; a ValueError for early stopping without validation pairs, or with both sources."""
    defense = TrainingDefense.of(spec)
    given = validation is not None and len(validation[0]) > 0
    if given and defense.validation_fraction > 0:
        raise ValueError("validation pairs are given and validation_fraction > 0: choose one validation source")
    if given and len(validation[0]) != len(validation[1]):
        raise ValueError(f"{len(validation[0])} validation images but {len(validation[1])} captions")
    if defense.early_stopping_patience > 0 and not (given or defense.validation_fraction > 0):
        raise ValueError("early stopping needs validation pairs: pass validation=... or set validation_fraction > 0")
    if not given:
        return image_uris, captions, *validation_split(len(image_uris), defense.validation_fraction, spec.seed)
    n, m = len(image_uris), len(validation[0])
    return [*image_uris, *validation[0]], [*captions, *validation[1]], torch.arange(n), torch.arange(n, n + m)


def validation_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train positions, validation positions), each sorted: a seeded `round(n * fraction)` (at least one) of
    `range(n)` held out, or all of them trained on when `fraction` is 0."""
    if fraction == 0:
        return torch.arange(n), torch.arange(0)
    n_val = max(1, round(n * fraction))
    if n - n_val < 2:
        raise ValueError(f"validation_fraction {fraction} of {n} records leaves {n - n_val} to train on")
    held = np.random.default_rng([seed, 0x5EED]).choice(n, n_val, replace=False)
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return torch.from_numpy(np.flatnonzero(~mask)), torch.from_numpy(np.flatnonzero(mask))


class EarlyStopping:
    """Tracks the validation loss per epoch; keeps a copy of the best epoch's weights."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_loss = math.inf
        self.best_epoch = -1
        self.epochs_since_best = 0
        self.losses: list[float] = []
        self._best_state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, loss: float, model: torch.nn.Module) -> bool:
        """Record epoch `epoch`'s validation loss; True when training should stop."""
        self.losses.append(loss)
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.epochs_since_best = loss, epoch, 0
            if self.patience > 0:
                self._best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.epochs_since_best += 1
        return 0 < self.patience <= self.epochs_since_best

    def restore_best(self, model: torch.nn.Module) -> bool:
        """Load the best epoch's weights into `model` (strict); False when there are none (no stopping rule)."""
        if self._best_state is None:
            return False
        model.load_state_dict(self._best_state, strict=True)
        return True

    def facts(self) -> dict[str, Any]:
        return {"validation_loss_history": self.losses, "best_epoch": self.best_epoch,
                "best_validation_loss": self.best_loss}  # fmt: skip


def augmenter(strength: float, seed: int, flip: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batched random augmentation of images in [0, 1] (n, c, h, w) at `strength` in (0, 1] (see the module
    docstring): each image gets its own parameters, drawn from torch's generator seeded per batch from a
    generator seeded with `seed`, so a run is reproducible and does not disturb the global random state."""
    if not 0 < strength <= 1:
        raise ValueError(f"augmentation strength {strength} must be in (0, 1]")
    jitter = 0.4 * strength
    colour = T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=0.05 * strength)
    batches = torch.Generator().manual_seed(seed)

    def apply(images: torch.Tensor) -> torch.Tensor:
        crop = T.RandomResizedCrop(list(images.shape[-2:]), scale=(1 - 0.6 * strength, 1.0), antialias=True)
        transform = T.Compose([crop, colour, *([T.RandomHorizontalFlip()] if flip else [])])
        batch_seed = int(torch.randint(2**62, (1,), generator=batches))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed)
            return torch.stack([transform(image) for image in images]).clamp(0, 1)

    return apply


def batch_inputs(
    images: torch.Tensor,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None,
    device: torch.device,
) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """The model inputs of a batch of positions: `images` as they are, or (with `normalise`, i.e. when
    augmenting) [0, 1] pixels augmented for training batches, then normalised; on `device`."""

    def inputs(idx: torch.Tensor, train: bool) -> torch.Tensor:
        x = images[idx]
        if normalise is not None:
            x = normalise(augment(x) if train else x)
        return x.to(device)

    return inputs


def training_facts(
    history: list[float],
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    validation: tuple[list[str], list[str]] | None,
    stopping: EarlyStopping | None,
    restored: bool,
    private: Any = None,
) -> dict[str, Any]:
    """What a training run's defense did, for the checkpoint's facts: pairs trained on and held out, epochs,
    early stopping's validation losses and best epoch, and DP-SGD's sampling, steps and epsilon (`private`:
    a `dp.PrivateTraining`)."""
    facts: dict[str, Any] = {"n_train": len(train_idx), "n_validation": len(val_idx), "epochs_trained": len(history)}
    if len(val_idx):
        facts.update({**stopping.facts(), "restored_best_epoch": restored})
        if validation is None or not len(validation[0]):  # held out of the given training pairs
            facts["validation_indices"] = val_idx.tolist()
    if private is not None:
        facts["dp"] = private.facts()
    return facts
