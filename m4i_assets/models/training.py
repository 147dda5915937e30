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
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as T

from m4i_assets.models.device import trains_deterministically


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
    """Tracks the validation loss per epoch; keeps a copy of the best epoch's weights. An epoch improves when its
    loss is below the best by more than `min_delta`."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best_loss = math.inf
        self.best_epoch = -1
        self.epochs_since_best = 0
        self.losses: list[float] = []
        self._best_state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, loss: float, model: torch.nn.Module) -> bool:
        """Record epoch `epoch`'s validation loss; True when training should stop."""
        self.losses.append(loss)
        if loss < self.best_loss - self.min_delta:
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


class SeededBatches:
    """Batches of positions in range(n), a fresh permutation per epoch from a generator seeded with `seed`:
    every batch of it (the last one possibly smaller), or with `drop_last` the first max(1, n // batch_size)
    (all n positions in one batch when n < batch_size)."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False) -> None:
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n // self.batch_size) if self.drop_last else math.ceil(self.n / self.batch_size)

    def __call__(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n, generator=self.generator)
        return (order[step * self.batch_size : (step + 1) * self.batch_size] for step in range(self.steps_per_epoch))


def train_loop(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batches: Callable[[], Iterable[torch.Tensor]],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    after_update: Callable[[], None] | None = None,
    min_batch: int = 1,
    noise_step: Callable[[], None] | None = None,
    validation_loss: Callable[[], float] | None = None,
    stopping: EarlyStopping | None = None,
    weights: torch.nn.Module | None = None,
) -> tuple[list[float], bool]:
    """The one training loop of every model the platform trains (CLIPs, captioners, the M^4I MFE, the WSA MLP);
    returns (mean training loss of each epoch, whether the best epoch's weights were restored).

    Each epoch: `net` in train mode, and for each batch of positions from `batches()`: `batch_loss(positions)`,
    zero the gradients, backward, `optimizer.step()`, `scheduler.step()`, `after_update()` (e.g. a clamp). A
    batch of fewer than `min_batch` positions (only DP-SGD's Poisson sampling draws one) is `noise_step()`, an
    optimizer step on the noise alone, and still a scheduler step. Hooks: augmentation lives in `batch_loss`'s
    inputs (`batch_inputs`), DP-SGD in the `net`, `optimizer`, `batches` and `noise_step` of a
    `models.dp.PrivateTraining`; with `stopping`, `validation_loss()` after every epoch decides early stopping and
    the best epoch's weights are loaded into `weights` (default `net`) at the end."""
    keep = net if weights is None else weights
    history: list[float] = []
    for epoch in range(epochs):
        net.train()
        losses = []
        for positions in batches():
            if len(positions) < min_batch:
                noise_step()
                if scheduler is not None:
                    scheduler.step()
                continue
            loss = batch_loss(positions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_update is not None:
                after_update()
            losses.append(loss.item())
        history.append(float(np.mean(losses)) if losses else float("nan"))
        if stopping is not None and stopping.update(epoch, validation_loss(), keep):
            break
    return history, stopping is not None and stopping.restore_best(keep)


def fit_pairs(
    model: torch.nn.Module,
    spec: Any,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    device: torch.device,
    optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
    batch_loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    validation_loss: Callable[[torch.nn.Module], float],
    *,
    coupled: bool,
    freeze: Iterable[str] = (),
    drop_last: bool = False,
    min_batch: int = 1,
    schedule: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler] | None = None,
    after_update: Callable[[torch.nn.Module], None] | None = None,
) -> tuple[list[float], EarlyStopping | None, bool, Any]:
    """Train `model` in place on the (image, caption) pairs at `train_idx` with `spec`'s defense switched on, by
    `train_loop`: returns (loss per epoch, the early stopping tracker, whether its best epoch was restored, the
    `dp.PrivateTraining` or None). The family gives the optimizer (of the parameters to train), the loss of a
    batch of pair indices and the validation loss, both through the module it is handed (the private copy under
    DP-SGD); `schedule(optimizer, steps per epoch)` an LR scheduler, `after_update(weights)` runs after each
    update. Under DP-SGD (`models.dp`): `coupled` (a loss that couples a batch's pairs) and `freeze`."""
    defense = TrainingDefense.of(spec)
    private = None
    if defense.dp:
        from m4i_assets.models import dp  # Opacus, imported only for DP training

        private = dp.PrivateTraining(model, optimizer, len(train_idx), spec.batch_size, spec.epochs, defense,
                                     spec.seed, device, coupled=coupled, freeze=freeze)  # fmt: skip
        net, trained, opt = private.module, private.private, private.optimizer
        batches, steps_per_epoch = private.batches, private.steps_per_epoch
    else:
        net = trained = model
        opt = optimizer(model.parameters())
        batches = SeededBatches(len(train_idx), spec.batch_size, spec.seed, drop_last)
        steps_per_epoch = batches.steps_per_epoch
    stopping = EarlyStopping(defense.early_stopping_patience) if len(val_idx) else None
    history, restored = train_loop(
        net, opt, spec.epochs, batches, lambda positions: batch_loss(net, train_idx[positions]),
        scheduler=None if schedule is None else schedule(opt, steps_per_epoch),
        after_update=None if after_update is None else lambda: after_update(trained),
        min_batch=min_batch, noise_step=None if private is None else private.noise_step,
        validation_loss=lambda: validation_loss(net), stopping=stopping, weights=trained,
    )  # fmt: skip
    if private is not None:
        private.export(model)
    model.eval()
    return history, stopping, restored, private


@trains_deterministically
def train_and_save(
    family: FamilyTraining,
    spec: Any,
    image_uris: list[str],
    captions: list[str],
    out_dir: str | os.PathLike,
    info: dict[str, Any],
    device: str | None = None,
    threads: int | None = None,
    validation: tuple[list[str], list[str]] | None = None,
) -> tuple[str, list[float], int, dict[str, Any]]:
    """Build, train and save one model of a family; return (sha256 of its weights, loss per epoch, parameter
    count, facts): what the training reports its defense did, also saved in the checkpoint's sidecar (as
    "defense") for a defended spec. `validation` (image uris, captions): held-out pairs for early stopping.

    Arguments are plain values (the family's functions by reference), so this runs as well in a spawn worker
    process (with `threads` torch threads) as in the caller's, to the same bytes."""
    bundle = family.build(spec, captions)
    facts: dict[str, Any] = {}
    history = family.train(bundle, image_uris, captions, spec, device, facts, validation)
    sidecar = {**info, **family.sidecar(spec), "n_train": len(image_uris), "loss_history": history}
    if spec.defense.active:
        sidecar["defense"] = facts
    _, sha = family.save(bundle, out_dir, sidecar)
    return sha, history, sum(p.numel() for p in bundle.model.parameters()), facts


@dataclass(frozen=True)
class FamilyTraining:
    """How `train_and_save` builds (spec, training captions), trains (bundle, uris, captions, spec, device, facts,
    validation), describes (spec -> extra sidecar entries) and saves (bundle, folder, sidecar) a family's model."""

    build: Callable[[Any, list[str]], Any]
    train: Callable[..., list[float]]
    sidecar: Callable[[Any], dict[str, Any]]
    save: Callable[[Any, str | os.PathLike, dict[str, Any]], tuple[Any, str]]


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
