"""Checkpoint files, independent of any model library: content hash, version name, header check, and
reading a weights file into a module with clear errors.

Light on purpose (torch is imported only by the functions that read tensors): the registry and the
per-version checkpoint asset use it.

Weights files: `.safetensors`, or a torch file (`.pt`, `.pth`, `.bin`) as open_clip's training writes it
(`{"state_dict": ..., "epoch": ...}`, keys possibly prefixed `module.`) or a bare state dict. Torch files
are read with `weights_only=True`: tensors and plain containers only, no arbitrary object is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)
HF_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # a Hugging Face directory's, in from_pretrained's order
# Where a Hugging Face directory keeps its image processor: `preprocessor_config.json` (ImageProcessor
# .save_pretrained, and older transformers' Processor.save_pretrained) or `processor_config.json` (a
# Processor saved by transformers 5, the image processor nested under "image_processor").
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
M4I_FILE = "m4i.json"  # the project's arch and info beside a Hugging Face directory's own files
HF_ARCH_PREFIX = "hf-"
"""`hf-<model_type>`: a Hugging Face directory's arch; as a captioner spec's arch, a model of `extra["config_dir"]`'s
config (a shadow of a user's captioner's own architecture)."""
HF_CLIP_ARCH = "hf-clip"  # the arch of a Hugging Face CLIP directory without our m4i.json
# open_clip's hub layout (every LAION / DataComp checkpoint, and what `open_clip.push_to_hf_hub.save_for_hf` writes):
# `open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...}) beside the weights, in open_clip's order.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
OPEN_CLIP_HUB_ARCH = "open_clip:hub"  # the arch of an open_clip hub folder (its model_cfg names no model)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


DEFAULT_AUDIT = "default"


def model_version_for(family: str, sha256: str, audit: str = DEFAULT_AUDIT) -> str:
    """The model version: family plus the first 12 hex digits of the checkpoint's sha256, and `@<audit>` for
    any audit but the default one, so that one checkpoint audited twice (a labelled and an unlabelled audit
    of one model) is two versions whose rows never overwrite each other."""
    return f"{family}-{sha256[:12]}" + ("" if audit == DEFAULT_AUDIT else f"@{audit}")


def safetensors_tensor_count(path: str | os.PathLike) -> int:
    """Parse a safetensors header (no tensor is loaded); a clear error naming the file if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return len(list(f.keys()))
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc


def hf_weights_file(folder: str | os.PathLike) -> Path | None:
    """The weights file of a Hugging Face directory (the first of `HF_WEIGHTS_FILES` present), or None."""
    return next((Path(folder) / n for n in HF_WEIGHTS_FILES if (Path(folder) / n).is_file()), None)


def image_processor_file(folder: str | os.PathLike, what: str) -> Path:
    """The file a Hugging Face directory keeps its image processor in (`IMAGE_PROCESSOR_FILES`); a
    FileNotFoundError naming it ("`what` incomplete") when there is none."""
    found = next((Path(folder) / n for n in IMAGE_PROCESSOR_FILES if (Path(folder) / n).is_file()), None)
    if found is None:
        missing, other = (Path(folder) / n for n in IMAGE_PROCESSOR_FILES)
        raise FileNotFoundError(f"{what} incomplete: {missing} not found (nor {other.name})")
    return found


def open_clip_weights_file(folder: str | os.PathLike) -> Path | None:
    """The weights file of an open_clip hub folder (the first of `OPEN_CLIP_WEIGHTS_FILES` present), or None."""
    return next((Path(folder) / n for n in OPEN_CLIP_WEIGHTS_FILES if (Path(folder) / n).is_file()), None)


def hf_clip_arch(folder: str | os.PathLike, model_type: str = "clip") -> str:
    """The arch of a Hugging Face dual-encoder directory: the config name in our `m4i.json`, else
    `hf-<model_type>` ("hf-clip", "hf-siglip", "hf-siglip2", ...)."""
    default = f"hf-{model_type}"  # HF_CLIP_ARCH for a CLIP
    try:
        arch = json.loads((Path(folder) / M4I_FILE).read_text()).get("arch")
    except (OSError, ValueError, AttributeError):
        return default
    return arch if isinstance(arch, str) else default


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _torch_load_reason(exc: BaseException) -> str:
    """Why `torch.load(weights_only=True)` failed, in one short phrase."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if refused:
        return f"it pickles {refused.group(1)}, not only tensors, and the weights-only load refuses it"
    return _first_line(exc).split(". ")[0]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (see the module docstring), on the CPU; FileNotFoundError or a
    ValueError naming the file when it is missing, empty, corrupt, truncated or holds no state dict."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: not a weights file (expected a name ending in one of {', '.join(WEIGHT_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint")
    if path.suffix == SAFETENSORS_SUFFIX:
        try:
            content = load_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path} is not a readable safetensors checkpoint: {_first_line(exc)}") from exc
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save's zip archive, or its legacy pickle
            raise ValueError(f"{path} is not a readable weights-only torch checkpoint: not a torch.save file")
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, corrupt, or it pickles objects other than tensors
            reason = _torch_load_reason(exc)
            raise ValueError(f"{path} is not a readable weights-only torch checkpoint: {reason}") from exc
    state = content.get("state_dict", content) if isinstance(content, dict) else content
    if not (
        isinstance(state, dict)
        and state
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ValueError(f"{path} holds no state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def checkpoint_tensor_count(path: str | os.PathLike) -> int:
    """The number of tensors in a weights file (a safetensors header only is parsed); clear errors as
    `read_state_dict`'s."""
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        return safetensors_tensor_count(path)
    return len(read_state_dict(path))


def first_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """The first difference between a module's state dict and a loaded one (a missing, mismatched or
    unexpected key), in words; None when they match."""
    for key, value in expected.items():
        if key not in state:
            return f"missing key {key!r}"
        if tuple(state[key].shape) != tuple(value.shape):
            return f"key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}"
    extra = [key for key in state if key not in expected]
    return f"unexpected key {extra[0]!r}" if extra else None


def load_weights(module: torch.nn.Module, path: str | os.PathLike, what: str) -> None:
    """Load a weights file into `module` strictly; a ValueError naming the file, `what` it should match and
    the first mismatched key otherwise. Non-persistent buffers that older files carry are ignored."""
    state = read_state_dict(path)
    expected = module.state_dict()
    transient = {name for name, _ in module.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k not in transient}
    problem = first_mismatch(expected, state)
    if problem:
        raise ValueError(f"{path} does not match {what}: {problem}")
    module.load_state_dict(state, strict=True)


def read_json_object(path: str | os.PathLike, missing: str = "not found") -> dict:
    """A JSON object from a checkpoint's side file; FileNotFoundError (`path` + `missing`) or ValueError
    naming the file when it is absent, not JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} {missing}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data
