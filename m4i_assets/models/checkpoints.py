"""Checkpoint files, independent of any model framework: content hash, version name, header check.

Light on purpose (no torch import): the registry and the per-version checkpoint asset use it.
"""

import hashlib
import os
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_version_for(family: str, sha256: str) -> str:
    """The model version: family plus the first 12 hex digits of the checkpoint's sha256."""
    return f"{family}-{sha256[:12]}"


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
