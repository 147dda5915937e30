"""The registry of model families (open_clip's factory style: one table of families, one way to reach any of
them): for each family, the module that builds, trains, saves and loads its models, how to recognize one of
its checkpoint folders, the role of the helper models its attacks learn from, and what one audited version
of it materializes (its signals, each attack's outputs, its metrics).

The assets, the watched-models sensor, the CLI and the defenses ask this registry; no other module branches on
a family's name.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from m4i_assets.data.audits import AuditSpec, Checkpoint
from m4i_assets.models.checkpoints import (
    OPEN_CLIP_HUB_ARCH,
    OPEN_CLIP_WEIGHTS_FILES,
    WEIGHT_SUFFIXES,
    checkpoint_tensor_count,
    hf_clip_arch,
    hf_weights_file,
    open_clip_weights_file,
    read_json_object,
)


class WatchedCheckpoint(NamedTuple):
    """A checkpoint folder's model family, arch and weights file (whose sha256 names the version)."""

    family: str
    arch: str
    weights: Path


@dataclass(frozen=True)
class Family:
    """One model family. `models`: the training assets (target, null control, helpers), `signals`: what an
    audited version computes before any attack, `helper_asset`: the asset that computes what the attacks read
    from every helper model of the audit (unpartitioned: helpers are not audited), `attacks`: each attack
    id of the audit registry and the assets it needs materialized (every output of a multi-asset it writes to,
    since a backfill runs a multi-asset whole), `unlabelled`: what an unlabelled audit reports instead of
    attack metrics, `sharded`: the signals (model forwards, one row per record) an audited version computes per
    record shard (`data.shards`), `interface`: what an attacker can query of an undefended version
    (`defenses.release.INTERFACES`), `utility`: its utility measure (a name of `scoring.UTILITIES`),
    `primary_utility`: the metric of it the privacy-utility tables read."""

    name: str
    module: str
    helper_role: str
    models: tuple[str, ...]
    defended: str
    signals: tuple[str, ...]
    helper_asset: str
    attacks: dict[str, tuple[str, ...]]
    unlabelled: tuple[str, ...]
    sharded: tuple[str, ...]
    interface: str
    utility: str
    primary_utility: str
    recognize: Callable[[dict, Path], tuple[str, Path] | None]

    def models_module(self) -> ModuleType:
        """`m4i_assets.models.<family>`: FAMILY, `train_and_save` (picklable), the loaders (imported lazily:
        torch is heavy)."""
        return importlib.import_module(self.module)

    def base_spec(self, settings: Any, seed_offset: int = 0) -> Any:
        """The training recipe of the audit's target (`seed_offset` 0) or of another model of the plan."""
        if self.helper_role == "reference":
            return settings.clip_train_spec(seed_offset)
        return settings.captioner_spec(settings.captioner_arch, seed_offset)

    def defenses(self, settings: Any) -> dict[str, list[float]]:
        """The defense grid of the settings for this family (`<family>_defenses`)."""
        return getattr(settings, f"{self.name}_defenses")

    def audit_has_helpers(self, audit: Any) -> bool:
        """Whether an audit of the registry has helpers: reference checkpoints of its own, or population
        records to train shadow captioners on."""
        return bool(audit.references) if self.helper_role == "reference" else "population" in audit.values

    @property
    def trained(self) -> tuple[str, ...]:
        """The assets that train or register the family's audited versions (targets, null controls, defended)."""
        return self.models[0], self.models[1], self.defended

    @property
    def defended_helper_role(self) -> str:
        """The role of a helper trained with a defense, for the adaptive attacker of a defended version
        (`defended_reference`, `defended_shadow`): no undefended audit ever learns from one."""
        return f"defended_{self.helper_role}"

    def helper_versions(self, storage: Any, audit: str, n: int) -> list[str]:
        """The helper versions an audit of this family learns from (its `n` reference CLIPs, or its newest
        shadow captioner of each dataset, arch and seed), and those trained with a defense, for its adaptive
        attacker."""
        defended = storage.repository.versions_of_role(audit, self.defended_helper_role)
        if self.helper_role == "reference":
            return (storage.repository.reference_versions(audit, n) if n else []) + defended
        return [m["model_version"] for m in storage.repository.shadow_models(audit)] + defended

    def audit_assets(self, planned: list[str] | None = None, labelled: bool = True) -> list[str]:
        """What one audited version materializes: its signals, the assets of the `planned` attacks (None: a
        controlled audit, every attack), then attack metrics, the report (it needs the blind baseline's shift
        gate) and utility (labelled), or the unlabelled estimates."""
        attacks = list(self.attacks) if planned is None else planned
        keys = [*self.signals, *(k for attack in attacks for k in self.attacks[attack])]
        if labelled:
            keys += ["attack_metrics", *(["audit_report"] if "blind_baseline" in attacks else []), "model_utility"]
        else:
            keys += self.unlabelled
        return list(dict.fromkeys(keys))

    def job_assets(self) -> list[str]:
        """Every asset an audit of this family may materialize (its job's selection)."""
        return list(dict.fromkeys([*self.audit_assets(), *self.unlabelled]))


def _single_weights_file(folder: Path) -> Path:
    """The one weights file of an open_clip folder (`model.safetensors`, `*.pt`, `*.pth` or `*.bin`)."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) > 1:
        raise ValueError(f"{folder}: {len(found)} weights files ({', '.join(p.name for p in found)}), expected one")
    return _required(found[0] if found else None, folder, "weights file (model.safetensors, *.pt, *.pth or *.bin)")


def _required(weights: Path | None, folder: Path, expected: str) -> Path:
    if weights is None or not weights.is_file():
        raise ValueError(f"{folder}: no {expected}")
    return weights


def _clip_checkpoint(config: dict, folder: Path) -> tuple[str, Path] | None:
    """An open_clip folder (`model.json` with family and arch), an open_clip hub folder (`open_clip_config.json`
    with its `model_cfg`: arch `open_clip:hub`, weights `open_clip_model.safetensors` or
    `open_clip_pytorch_model.bin`) or a Hugging Face dual-encoder directory (`config.json` of a CLIP, SigLIP,
    SigLIP 2, ...: arch `hf-<model_type>`, or the config name in its `m4i.json`). Whether a config other than a
    CLIPModel's is a dual encoder is transformers' answer (`hf_clip.dual_encoder_of`, imported only then: a
    BLIP captioner shares the BLIP dual encoder's model_type, and is not one)."""
    if config.get("family") == "clip" and isinstance(config.get("arch"), str):
        return config["arch"], _single_weights_file(folder)
    if isinstance(config.get("model_cfg"), dict):  # open_clip_config.json
        expected = f"{OPEN_CLIP_WEIGHTS_FILES[0]} (nor {', '.join(OPEN_CLIP_WEIGHTS_FILES[1:])})"
        return OPEN_CLIP_HUB_ARCH, _required(open_clip_weights_file(folder), folder, expected)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return None
    if not (model_type == "clip" and config.get("architectures", ["CLIPModel"]) == ["CLIPModel"]):
        from m4i_assets.models.hf_clip import dual_encoder_of  # lazy: torch and transformers

        if dual_encoder_of(config) is None:
            return None
    weights = _required(hf_weights_file(folder), folder, "model.safetensors (nor pytorch_model.bin)")
    return hf_clip_arch(folder, model_type), weights


def _captioner_checkpoint(config: dict, folder: Path) -> tuple[str, Path] | None:
    """This platform's captioner (`config.json` with family and spec) or a Hugging Face image-to-text directory
    (`hf_captioner.is_captioner_config`: a model_type that transformers' AutoModelForImageTextToText loads, saved
    as that class: VisionEncoderDecoderModel, BlipForConditionalGeneration, GitForCausalLM, ...; transformers is
    imported only then), its arch the spec's of our `m4i.json`, else `hf-<model_type>`."""
    if config.get("family") == "captioner":
        weights = _required(folder / "model.safetensors", folder, "model.safetensors")
        return config.get("spec", {}).get("arch", "cnn-lstm"), weights
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    from m4i_assets.models.hf_captioner import is_captioner_config  # lazy: torch and transformers

    if not is_captioner_config(config):
        return None
    spec = read_json_object(folder / "m4i.json").get("spec") if (folder / "m4i.json").is_file() else None
    arch = spec.get("arch") if isinstance(spec, dict) else None
    arch = arch if isinstance(arch, str) else f"hf-{model_type}"
    return arch, _required(hf_weights_file(folder), folder, "model.safetensors (nor pytorch_model.bin)")


# The captioner attacks' scores: the outputs of one multi-asset, so an audit requests all of them (an attack its
# plan skips writes a skipped row).
CAPTIONER_SCORES = ("m4i_mb_scores", "m4i_fb_scores", "m4i_loss_scores", "m4i_loss_ref_scores")

FAMILIES: dict[str, Family] = {
    "clip": Family(
        name="clip",
        module="m4i_assets.models.clip",
        helper_role="reference",
        models=("target_clip", "null_control_clip", "reference_clips"),
        defended="defended_clips",
        signals=("model_checkpoint", "embeddings"),
        helper_asset="reference_embeddings",
        attacks={"csa": ("csa_scores",), "aea": ("augmentation_deltas", "aea_scores"),
                 "clip_loss": ("clip_loss_scores",), "rmia": ("rmia_scores",),
                 "wsa": ("pseudo_labels", "wsa_attack_model", "wsa_scores"),
                 "ref_calibrated": ("ref_calibrated_scores",), "blind_baseline": ("blind_baseline_scores",)},
        unlabelled=("membership_rate",),
        sharded=("embeddings", "augmentation_deltas"),
        interface="embeddings",
        utility="retrieval",
        primary_utility="i2t_recall@5",
        recognize=_clip_checkpoint,
    ),
    "captioner": Family(
        name="captioner",
        module="m4i_assets.models.captioner",
        helper_role="shadow",
        models=("target_captioner", "null_control_captioner", "shadow_captioners"),
        defended="defended_captioners",
        signals=("model_checkpoint", "generated_captions", "caption_metrics", "caption_nll"),
        helper_asset="m4i_attack_models",
        attacks={"m4i_mb": (*CAPTIONER_SCORES, "m4i_scenarios"), "m4i_fb": (*CAPTIONER_SCORES, "m4i_scenarios"),
                 "m4i_loss": CAPTIONER_SCORES, "m4i_loss_ref": CAPTIONER_SCORES,
                 "blind_baseline": ("blind_baseline_scores",)},
        unlabelled=(),
        sharded=("generated_captions", "caption_nll"),
        interface="likelihoods",
        utility="captioning",
        primary_utility="cider",
        recognize=_captioner_checkpoint,
    ),
}  # fmt: skip


CHECKPOINT_FILES = ("model.json", "config.json", "open_clip_config.json")
SUPPORTED = (
    "clip: an open_clip weights file beside a model.json (family, arch), an open_clip hub folder "
    "(open_clip_config.json), or a Hugging Face dual encoder (config.json of a CLIPModel, SiglipModel, Siglip2Model, "
    "...); captioner: this platform's (config.json with family 'captioner') or a Hugging Face image-to-text model "
    "(config.json of a VisionEncoderDecoderModel, BlipForConditionalGeneration, GitForCausalLM, ...)"
)
"""The checkpoint folders the registry recognizes, for refusals."""


def describe_checkpoint(folder: Path) -> WatchedCheckpoint:
    """(family, arch, weights file) of a checkpoint folder some family of the registry recognizes from its
    `model.json`, `config.json` or `open_clip_config.json`; a ValueError naming the file, what it says it is (its
    `model_type` and `architectures`) and the kinds supported when none does."""
    found = []
    for name in CHECKPOINT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        config = read_json_object(path)
        for family in FAMILIES.values():
            recognized = family.recognize(config, folder)
            if recognized is not None:
                return WatchedCheckpoint(family.name, *recognized)
        said = {k: config[k] for k in ("family", "model_type", "architectures") if k in config}
        found.append(f"{path} ({', '.join(f'{k} {v!r}' for k, v in said.items()) or 'no family or model_type'})")
    if not found:
        raise ValueError(
            f"{folder}: none of {', '.join(CHECKPOINT_FILES)}: not a checkpoint folder; supported: {SUPPORTED}"
        )
    raise ValueError(f"{'; '.join(found)}: not a model M4I audits; supported: {SUPPORTED}")


def zero_shot_text_embeddings(bundle: Any, prompts: list[str]) -> Any:
    """The CLIP's L2-normalised text embeddings of zero-shot prompts (Radford et al. 2021, section 3.1.4), as a
    float numpy array, one row per prompt."""
    import torch

    with torch.no_grad():
        tokens = bundle.tokenizer(prompts).to(next(bundle.model.parameters()).device)
        return bundle.model.encode_text(tokens, normalize=True).float().cpu().numpy()


def stage_checkpoint(staging: Path, audit: AuditSpec, checkpoint: Checkpoint) -> tuple[Path, WatchedCheckpoint]:
    """A checkpoint of the audit registry as a folder `describe_checkpoint` knows: a folder that says what it is
    (a Hugging Face directory's `config.json`, an open_clip hub folder's `open_clip_config.json`) as it is, also when
    the registry names a file in it; another directory as it is (an open_clip folder without model.json gets one
    from `arch:`); a bare weights file in a new folder under `staging` beside its model.json. Its weights file is
    read before anything is registered (a safetensors header parsed, a torch file loaded weights-only), so a file
    that is no checkpoint, or pickles objects, is refused here, naming it; nothing staged outlives a refusal."""
    path = Path(checkpoint.path)
    if not path.exists():
        raise FileNotFoundError(f"audit {audit.name!r}: checkpoint not found: {path}")
    folder = path if path.is_dir() else path.parent
    self_describing = any((folder / name).is_file() for name in CHECKPOINT_FILES[1:])
    if not self_describing and (path.is_file() or (checkpoint.arch and not (folder / "model.json").is_file())):
        weights = path if path.is_file() else None
        if weights is None:
            found = [p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
            if len(found) != 1:
                raise ValueError(f"audit {audit.name!r}: {folder} needs exactly one weights file, found {len(found)}")
            weights = found[0]
        if weights.suffix not in WEIGHT_SUFFIXES:
            suffixes = ", ".join(WEIGHT_SUFFIXES)
            raise ValueError(
                f"audit {audit.name!r}: {weights} is not a checkpoint: give a weights file ({suffixes}) or a "
                f"checkpoint folder; supported: {SUPPORTED}"
            )
        arch = checkpoint.arch or read_json_object(weights.parent / "model.json").get("arch")
        if not isinstance(arch, str) or not arch:
            raise ValueError(f"audit {audit.name!r}: {path} needs `arch:` (an open_clip architecture) in the registry")
        folder = Path(tempfile.mkdtemp(dir=staging))
        shutil.copy(weights, folder / weights.name)
        (folder / "model.json").write_text(json.dumps({"family": audit.family, "arch": arch}))
    try:
        described = describe_checkpoint(folder)
        if described.family != audit.family:
            raise ValueError(f"audit {audit.name!r} audits {audit.family} models, but {path} is a {described.family}")
        checkpoint_tensor_count(described.weights)
    except (OSError, ValueError):
        if folder.parent == staging:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, described
