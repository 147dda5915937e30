"""CLIP model adapter: one way to build, train, save and load any contrastive dual encoder (image and text
embeddings and a pairing score): open_clip's CLIPs and SigLIPs, and Hugging Face's CLIP, SigLIP, SigLIP 2, ...

Architectures: open_clip's config registry (the project's small CPU-trainable configs live in `configs/`
and are registered at import: `m4i-tiny-vit`, `m4i-tiny-rn` and the sigmoid-loss `m4i-tiny-siglip`; open_clip
builds them offline with `pretrained=None`, a config without `hf_tokenizer_name` with open_clip's CLIP BPE), and
the project's Hugging Face configs in `hf_clip.CONFIGS` (a `transformers.CLIPModel` behind the same interface,
its word vocabulary built from the training captions). `build_clip(arch)` builds either kind.

Checkpoints, by what the path is (`load_clip`; every layout also loads from its weights file, with its side
files beside it, as the platform reloads a registered version):
- a weights file of an open_clip architecture: `model.safetensors` as this module saves it (no metadata,
  beside a `model.json` naming the arch), or a torch file (`.pt`, `.pth`, `.bin`) as open_clip's training
  writes it (`{"state_dict": ...}`, keys possibly prefixed `module.`) or a bare state dict, read
  weights-only (`checkpoints.read_state_dict`);
- an open_clip hub folder (every LAION / DataComp checkpoint; what `open_clip.push_to_hf_hub.save_for_hf`
  writes): `open_clip_config.json` (`model_cfg`, `preprocess_cfg`), `open_clip_model.safetensors` or
  `open_clip_pytorch_model.bin`, tokenizer files. The model is built from `model_cfg` (open_clip's `local-dir:`
  factory; timm image towers and Hugging Face text towers too, a tower's or tokenizer's name resolved against
  the folder when the folder holds its files), the preprocessing from `preprocess_cfg` (mean, std, size,
  interpolation, resize mode), the tokenizer from the folder (`text_cfg.hf_tokenizer_name`) or open_clip's
  CLIP BPE. Arch `open_clip:hub`;
- a Hugging Face dual-encoder directory (`hf_clip`: `config.json` of any model_type transformers maps to a
  class with `get_image_features` and `get_text_features` and a pairing loss, its weights, tokenizer and
  image processor), or its weights file. Arch `hf-<model_type>` (`hf-clip`, `hf-siglip`, `hf-siglip2`), or the
  project's config name from `m4i.json`.
The sha256 of the weights file names the model version. A missing, corrupt or mismatched checkpoint is a
FileNotFoundError or ValueError naming the file (and for a mismatch the arch and the first mismatched key).

Each bundle carries its pairing objective (`ClipBundle.objective`, read from the model): "softmax" (CLIP's
InfoNCE at the learned logit scale) or "sigmoid" (SigLIP's pair likelihood at the learned scale and bias; a
model with a `logit_bias`). The attacks that score pairs use it (`attacks.clip_loss`), and so does training:
open_clip's symmetric InfoNCE (`ClipLoss`) or its `SigLipLoss` (with bias), on the eval-preprocessed images,
with no augmentation by default: the embedded default deliberately trains a target that memorises its
members, so membership ground truth produces a measurable signal (Ko et al. 2023).

Training-time defenses (`spec.defense`, `models.training`, `models.dp`): DP-SGD with Opacus (open_clip ViT archs; what
the reported epsilon does and does not cover for the contrastive loss is in `models.dp`), training-time
augmentation, weight decay and early stopping on a validation split, all switched on by the spec and run by
the one training loop below; a defended checkpoint is an ordinary checkpoint of its arch.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import torch
import transformers
from open_clip.loss import SigLipLoss
from PIL import Image
from safetensors.torch import save_file

from m4i_assets.data.images import open_rgb
from m4i_assets.models import hf_clip
from m4i_assets.models.checkpoints import (
    HF_WEIGHTS_FILES,
    M4I_FILE,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_HUB_ARCH,
    OPEN_CLIP_WEIGHTS_FILES,
    TORCH_SUFFIXES,
    hf_clip_arch,
    load_weights,
    open_clip_weights_file,
    read_json_object,
    sha256_file,
)
from m4i_assets.models.device import device_for
from m4i_assets.models.training import (
    FamilyTraining,
    TrainingDefense,
    augmenter,
    batch_inputs,
    fit_pairs,
    split_pairs,
    training_facts,
)
from m4i_assets.models.training import (
    train_and_save as train_family_and_save,
)

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)

FAMILY = "clip"
# Frozen under DP-SGD besides what Opacus cannot sample (`models.dp`): a dense per-sample gradient of the
# 49408-token embedding table costs 1.6 GB and several seconds per step of 64 pairs.
DP_FROZEN = ("token_embedding.weight",)


@dataclass(frozen=True)
class ClipTrainSpec(TrainingDefense):
    """How to train a CLIP. `seed` fixes initialisation and batch order (and a defense's randomness); the
    training-time defense fields, all off by default, are inherited from `TrainingDefense`."""

    arch: str = "m4i-tiny-vit"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    seed: int = 0


@dataclass(frozen=True)
class Objective:
    """The pairing objective a dual encoder is trained with, and so the score it gives a pair: `kind`
    "softmax" (CLIP: InfoNCE over the batch, Radford et al. 2021) or "sigmoid" (SigLIP: every pair its own
    binary classification, Zhai et al. 2023). A pair's logit is `logit_scale * cos + logit_bias`, with
    `logit_scale` the multiplier (the exp of the learned log-scale) and `logit_bias` the sigmoid's learned
    bias (0 for softmax, where a bias cancels)."""

    kind: Literal["softmax", "sigmoid"]
    logit_scale: float
    logit_bias: float = 0.0


def objective_of(model: torch.nn.Module) -> Objective:
    """The objective of a built model: sigmoid when it has a learned `logit_bias` (open_clip's SigLIPs,
    `init_logit_bias`; Hugging Face's SigLIP and SigLIP 2), else softmax; its scale and bias as they are now."""
    scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
    bias = getattr(model, "logit_bias", None)
    if isinstance(bias, torch.Tensor):
        return Objective("sigmoid", scale, float(bias.detach().float().reshape(-1)[0]))
    return Objective("softmax", scale)


@dataclass
class ClipBundle:
    """A built CLIP with the functions that prepare its inputs. `preprocess` is a torchvision Compose
    ending in Normalize; `tokenizer` returns a LongTensor (n, context length). A Hugging Face model's
    `model` is an `hf_clip.HFClip` and it carries its image processor (saved with it). `objective` is the
    pairing objective of the model's current parameters."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    arch: str
    embed_dim: int
    image_processor: transformers.BaseImageProcessor | None = None

    @property
    def is_hugging_face(self) -> bool:
        return isinstance(self.model, hf_clip.HFClip)

    @property
    def objective(self) -> Objective:
        return objective_of(self.model)


def _hugging_face_bundle(parts: hf_clip.Parts, arch: str) -> ClipBundle:
    return ClipBundle(
        parts.model, parts.preprocess, parts.tokenizer, arch, parts.model.embed_dim, parts.image_processor
    )


def build_clip(arch: str, seed: int = 0, captions: Sequence[str] | None = None) -> ClipBundle:
    """Build an untrained CLIP with seeded initialisation: an open_clip registered architecture, or a
    Hugging Face config of `hf_clip.CONFIGS`, whose vocabulary is built from `captions`."""
    if arch in hf_clip.CONFIGS:
        if captions is None:
            raise ValueError(f"{arch} builds its vocabulary from the training captions: pass captions")
        torch.manual_seed(seed)
        return _hugging_face_bundle(hf_clip.build(arch, captions), arch)
    if arch not in open_clip.list_models():
        raise ValueError(
            f"unknown CLIP architecture {arch!r}; registered: {sorted(hf_clip.CONFIGS)}, "
            f"{sorted(open_clip.list_models())[:8]}..."
        )
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    return ClipBundle(
        model=model, preprocess=preprocess, tokenizer=_registered_tokenizer(arch), arch=arch, embed_dim=embed_dim(arch)
    )


def _registered_tokenizer(arch: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer of a registered config: its `hf_tokenizer_name`'s, else open_clip's CLIP BPE at
    the config's context length (`get_tokenizer`'s choice, but for a name with "siglip" in it, for which
    open_clip would fetch Google's SigLIP tokenizer whatever the config says)."""
    text_cfg = open_clip.get_model_config(arch).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.get_tokenizer(arch)
    context = text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)
    return open_clip.SimpleTokenizer(context_length=context, **text_cfg.get("tokenizer_kwargs", {}))


def embed_dim(arch: str) -> int:
    """The joint embedding width of a registered architecture (open_clip's or a Hugging Face config)."""
    if arch in hf_clip.CONFIGS:
        return int(hf_clip.CONFIGS[arch]["projection_dim"])
    return int(open_clip.get_model_config(arch)["embed_dim"])


def load_images(bundle: ClipBundle, image_uris: list[str]) -> torch.Tensor:
    """Decode and eval-preprocess images into one tensor (small training sets fit in memory)."""
    return torch.stack([bundle.preprocess(open_rgb(uri)) for uri in image_uris])


def split_normalisation(preprocess) -> tuple[Callable, Callable]:
    """Split an open_clip eval transform into (to-[0,1]-tensor part, final Normalize)."""
    steps = list(preprocess.transforms)
    if not steps or type(steps[-1]).__name__ != "Normalize":
        raise ValueError("expected the eval preprocessing to end with Normalize")
    return type(preprocess)(steps[:-1]), steps[-1]


def train_clip(
    bundle: ClipBundle,
    image_uris: list[str],
    captions: list[str],
    spec: ClipTrainSpec,
    device: str | None = None,
    facts: dict[str, Any] | None = None,
    validation: tuple[list[str], list[str]] | None = None,
) -> list[float]:
    """Train `bundle.model` in place on matched pairs, with `spec.defense` switched on; return the mean loss
    of each epoch. What the defense did (pairs trained on and held out, epochs, best epoch, DP's sampling,
    steps and epsilon) is written into `facts` when given. `validation` (image uris, captions) are held-out
    pairs for early stopping, instead of a `validation_fraction` of the training pairs."""
    defense = spec.defense
    dev = device_for(device)
    image_uris, captions, train_idx, val_idx = split_pairs(image_uris, captions, validation, spec)
    n = len(image_uris)
    if 0 < len(val_idx) < 2:
        raise ValueError(f"the contrastive validation loss needs 2 held-out pairs; {len(val_idx)} of {n} held out")
    if defense.augment > 0:  # keep [0, 1] pixels: augment them per batch, then normalise
        to_unit, normalise = split_normalisation(bundle.preprocess)
        images = torch.stack([to_unit(open_rgb(uri)) for uri in image_uris])
        augment = augmenter(defense.augment, spec.seed)
    else:
        images, normalise, augment = load_images(bundle, image_uris), None, None
    tokens = bundle.tokenizer(captions)
    model = bundle.model.to(dev).train()
    if defense.dp and bundle.is_hugging_face:
        raise ValueError(f"DP-SGD is implemented for open_clip ViT CLIPs, not the Hugging Face {bundle.arch}")
    loss_fn = SigLipLoss() if bundle.objective.kind == "sigmoid" else open_clip.ClipLoss()
    inputs = batch_inputs(images, augment, normalise, dev)
    use_amp = dev.type == "cuda" and not defense.dp  # DP-SGD runs in fp32

    def batch_loss(net: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, enabled=use_amp):
            return pair_loss(loss_fn, net(inputs(idx, True), tokens[idx].to(dev)))

    def validation_loss(net: torch.nn.Module) -> float:
        with torch.no_grad(), torch.autocast(dev.type, enabled=use_amp):
            return _validation_loss(net, inputs, tokens, val_idx, spec.batch_size, loss_fn, dev)

    def schedule(opt: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
        total = steps_per_epoch * spec.epochs
        return torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (
                min(1.0, (s + 1) / max(1, spec.warmup_steps))
                * 0.5 * (1 + np.cos(np.pi * min(s, total) / max(1, total)))
            ),
        )  # fmt: skip

    def clamp_temperature(trained: torch.nn.Module) -> None:
        with torch.no_grad():  # open_clip clamps the learned temperature at 100
            trained.logit_scale.clamp_(0, np.log(100))

    history, stopping, restored, private = fit_pairs(
        model, spec, train_idx, val_idx, dev,
        lambda params: torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay),
        batch_loss, validation_loss, coupled=True, freeze=DP_FROZEN, drop_last=True,
        min_batch=2,  # a single pair has no contrastive loss: under DP's Poisson sampling, a noise-only step
        schedule=schedule, after_update=clamp_temperature,
    )  # fmt: skip
    if facts is not None:
        facts.update(training_facts(history, train_idx, val_idx, validation, stopping, restored, private))
    return history


def pair_loss(loss_fn: torch.nn.Module, out: Sequence[torch.Tensor]) -> torch.Tensor:
    """The training loss of a forward's (image features, text features, logit scale[, logit bias]): open_clip's
    `SigLipLoss` reads the bias a sigmoid model returns, `ClipLoss` the first three."""
    return loss_fn(*out[:4]) if isinstance(loss_fn, SigLipLoss) else loss_fn(*out[:3])


def _validation_loss(
    net: torch.nn.Module, inputs: Callable, tokens: torch.Tensor, val_idx: torch.Tensor, batch_size: int, loss_fn,
    dev: torch.device,
) -> float:  # fmt: skip
    """The contrastive loss on the held-out pairs, in fixed batches (a last single pair joins no batch)."""
    net.eval()
    total, count = 0.0, 0
    for start in range(0, len(val_idx), batch_size):
        idx = val_idx[start : start + batch_size]
        if len(idx) >= 2:
            total += pair_loss(loss_fn, net(inputs(idx, False), tokens[idx].to(dev))).item() * len(idx)
            count += len(idx)
    net.train()
    return total / count


def _build(spec: ClipTrainSpec, captions: list[str]) -> ClipBundle:
    return build_clip(spec.arch, seed=spec.seed, captions=captions)


def _sidecar(spec: ClipTrainSpec) -> dict[str, Any]:
    return {"train": asdict(spec)}


def save_clip(
    bundle: ClipBundle, out_dir: str | os.PathLike, info: dict[str, Any], weights: str = "model.safetensors"
) -> tuple[Path, str]:
    """Save a CLIP folder; return (weights file, its sha256).

    open_clip: the weights as `weights` (`model.safetensors`, no metadata; or a `.pt`/`.pth`/`.bin` torch
    file in open_clip's training layout, `{"state_dict": ...}`) plus a `model.json` sidecar (arch, family,
    info). Hugging Face: `save_pretrained` of model, tokenizer and image processor (`model.safetensors`)
    plus `m4i.json` (arch, family, info)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sidecar = json.dumps({"arch": bundle.arch, "family": FAMILY, **info}, indent=2, default=str)
    if bundle.is_hugging_face:
        if weights != HF_WEIGHTS_FILES[0]:
            raise ValueError(f"a Hugging Face CLIP is saved as {HF_WEIGHTS_FILES[0]}, not {weights}")
        parts = hf_clip.Parts(bundle.model, bundle.preprocess, bundle.tokenizer, bundle.image_processor)
        ckpt = hf_clip.save(parts, out)
        (out / M4I_FILE).write_text(sidecar)
        return ckpt, sha256_file(ckpt)
    if bundle.arch not in open_clip.list_models():
        raise ValueError(
            f"{bundle.arch!r} is not a registered open_clip architecture that a model.json can name: "
            "save an open_clip hub model with open_clip.push_to_hf_hub.save_for_hf"
        )
    ckpt = out / weights
    state = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    if ckpt.suffix in TORCH_SUFFIXES:
        torch.save({"state_dict": state}, ckpt)
    elif ckpt.suffix == ".safetensors":
        # No safetensors metadata: it is a hash map whose order varies between runs, and the file's sha256
        # must depend on the weights alone (arch and family are in the JSON sidecar).
        save_file(state, str(ckpt))
    else:
        raise ValueError(f"{weights}: a CLIP is saved as .safetensors or {', '.join(TORCH_SUFFIXES)}")
    (out / "model.json").write_text(sidecar)
    return ckpt, sha256_file(ckpt)


def _sidecar_arch(path: Path) -> str:
    """The arch named by the `model.json` beside an open_clip weights file."""
    sidecar = path.parent / "model.json"
    try:
        config = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: no architecture given (arch=...) and no readable {sidecar} naming one") from exc
    if not isinstance(config, dict) or config.get("family") != FAMILY or not isinstance(config.get("arch"), str):
        raise ValueError(f"{path}: no architecture given (arch=...) and {sidecar} does not name one (family, arch)")
    return config["arch"]


def _inside(folder: Path, name: Any) -> str | None:
    """`name` (a tower's or tokenizer's `hf_*_name`) as a path inside `folder` when the folder holds it, else
    None (a hub id, or a path outside the folder)."""
    if not isinstance(name, str) or not name:
        return None
    candidate = (folder / name).resolve()
    return str(candidate) if candidate.exists() and candidate.is_relative_to(folder.resolve()) else None


def _hub_tokenizer(folder: Path, text_cfg: dict[str, Any]) -> Callable[[list[str]], torch.Tensor]:
    """The tokenizer of an open_clip hub folder, as open_clip's `get_tokenizer("local-dir:...")` picks it: with
    `hf_tokenizer_name`, an `HFTokenizer` of the folder's own files (of the folder inside it that the name
    names, when it names one), else open_clip's CLIP BPE; at the config's context length and tokenizer kwargs."""
    context = text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    name = text_cfg.get("hf_tokenizer_name")
    if not name:
        return open_clip.SimpleTokenizer(context_length=context, **kwargs)
    source = _inside(folder, name) or str(folder)
    try:
        return open_clip.tokenizer.HFTokenizer(
            source, context_length=context, tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs
        )
    except Exception as exc:
        raise ValueError(
            f"the tokenizer files in {source} (hf_tokenizer_name {name!r} of "
            f"{folder / OPEN_CLIP_CONFIG}) do not load: {exc}"
        ) from exc


def _load_open_clip_hub(folder: Path, weights: Path | None, arch: str | None) -> ClipBundle:
    """Load an open_clip hub folder (see the module docstring) with its `weights` file (by default the first of
    `OPEN_CLIP_WEIGHTS_FILES`, as open_clip picks it)."""
    config_path = folder / OPEN_CLIP_CONFIG
    model_cfg = read_json_object(config_path, f"not found: {folder} is not an open_clip hub folder").get("model_cfg")
    if not (
        isinstance(model_cfg, dict) and all(isinstance(model_cfg.get(k), dict) for k in ("vision_cfg", "text_cfg"))
    ):
        raise ValueError(f"{config_path} holds no model_cfg with vision_cfg and text_cfg (open_clip's hub layout)")
    weights = weights or open_clip_weights_file(folder)
    if weights is None:
        raise FileNotFoundError(
            f"CLIP checkpoint incomplete: {folder / OPEN_CLIP_WEIGHTS_FILES[0]} not found "
            f"(nor {', '.join(OPEN_CLIP_WEIGHTS_FILES[1:])})"
        )
    text_cfg, vision_cfg = dict(model_cfg["text_cfg"]), dict(model_cfg["vision_cfg"])
    if "hf_model_name" in text_cfg:  # a Hugging Face text tower: built from its config, never downloaded
        text_cfg["hf_model_name"] = _inside(folder, text_cfg["hf_model_name"]) or text_cfg["hf_model_name"]
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{folder}",
            load_weights=False,
            pretrained_image=False,
            pretrained_text=False,
            text_cfg=text_cfg,
            vision_cfg=vision_cfg,
        )
    except Exception as exc:
        raise ValueError(f"{config_path} does not give an open_clip model: {exc}") from exc
    load_weights(model, weights, f"the open_clip model of {config_path}")
    embed = int(model_cfg.get("embed_dim", 0)) or int(model.text_projection.shape[-1])
    return ClipBundle(model, preprocess, _hub_tokenizer(folder, text_cfg), arch or OPEN_CLIP_HUB_ARCH, embed)


def _layout(path: Path, arch: str | None) -> str:
    """What `load_clip` loads `path` as: "open_clip" (a weights file of a registered arch), "hub" (an open_clip
    hub folder) or "hugging_face". An arch that open_clip registers, or one of this module's arch names, decides;
    else the folder's files: a directory with `open_clip_config.json` and no dual-encoder `config.json` (a
    LAION folder may hold both, loaded as either), or its open_clip weights file, is a hub folder."""
    folder = path if path.is_dir() else path.parent
    if path.is_file() and arch in open_clip.list_models():
        return "open_clip"
    hub = (folder / OPEN_CLIP_CONFIG).is_file()
    if hub and (arch or "").startswith("open_clip:"):
        return "hub"
    if path.is_dir():
        return "hub" if hub and not hf_clip.is_clip_dir(folder) else "hugging_face"
    if hub and path.name in OPEN_CLIP_WEIGHTS_FILES:
        return "hub"
    return "hugging_face" if hf_clip.is_clip_dir(folder) else "open_clip"


def load_clip(checkpoint: str | os.PathLike, arch: str | None = None, device: str | None = None) -> ClipBundle:
    """Load a CLIP checkpoint (see the module docstring): an open_clip hub folder, a Hugging Face dual-encoder
    directory, or either one's weights file, or an open_clip weights file of `arch` (by default the arch of
    the `model.json` beside it).

    A missing, corrupt or mismatched checkpoint is a FileNotFoundError or ValueError naming the file."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    folder = path if path.is_dir() else path.parent
    weights = None if path.is_dir() else path
    layout = _layout(path, arch)
    if layout == "hub":
        bundle = _load_open_clip_hub(folder, weights, arch if (arch or "").startswith("open_clip:") else None)
    elif layout == "hugging_face":
        parts = hf_clip.load(folder, weights=weights)
        bundle = _hugging_face_bundle(parts, hf_clip_arch(folder, hf_clip.read_config(folder)["model_type"]))
    else:
        arch = arch or _sidecar_arch(path)
        if arch not in open_clip.list_models():
            raise ValueError(
                f"{path}: {arch!r} is not an open_clip architecture, and {folder} is neither an open_clip hub "
                f"folder ({OPEN_CLIP_CONFIG}) nor a Hugging Face dual-encoder directory (config.json of a CLIP, "
                "SigLIP, ...)"
            )
        bundle = build_clip(arch)
        load_weights(bundle.model, path, f"architecture {arch!r}")
    bundle.model.to(device_for(device)).eval()
    return bundle


TRAINING = FamilyTraining(build=_build, train=train_clip, sidecar=_sidecar, save=save_clip)
train_and_save = functools.partial(train_family_and_save, TRAINING)
"""`train_and_save(spec, image_uris, captions, out_dir, info, device=None, threads=None, validation=None)`: build,
train (`train_clip`) and save one CLIP; returns (sha256, loss per epoch, parameter count, facts), the `model.json`
sidecar holding the spec ("train") and, for a defended spec, the facts ("defense"). `models.training.train_and_save`."""
