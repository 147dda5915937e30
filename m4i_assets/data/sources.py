"""Data sources: one description (`SourceSpec`) for every format that becomes `records`, and a registry
file that lists a user's sources.

Formats: `manifest` (JSONL / CSV / Parquet files, `manifest.py`), `coco` (captions JSON + image folder,
`coco.py`), `webdataset` (img2dataset tar shards, `webdataset.py`), `huggingface` (the hub's Parquet files or
a `Dataset.save_to_disk` folder, images stored in the rows, `huggingface.py`) and `embedded` (the generated
default corpus, written as a JSONL manifest and read like any other). Every source is read in shards, one at a
time: a manifest per file, a WebDataset per tar, a Hugging Face dataset per Parquet or Arrow file, COCO in
`shards` slices by image, the embedded corpus in one. The registry (`datasets.yaml`) looks like:

    datasets:
      - name: coco_val2017
        format: coco
        path: /data/coco/annotations/captions_val2017.json
        images: /data/coco/val2017
        shards: 4
      - name: laion_sample
        format: webdataset
        path: /data/laion_sample/*.tar
      - name: my_pairs
        format: manifest
        path: /data/my_pairs/manifest.csv
        columns: {image: filepath, caption: title}   # optional: record field -> the file's column
        root: /data/my_pairs                         # optional: images outside it are `outside_root` rejects
        max_bytes: 67108864                          # optional: larger image files are rejected unread
      - name: hub_pairs
        format: huggingface
        path: /data/hub_pairs/train-*.parquet        # or a Dataset.save_to_disk folder
        columns: {image: image, caption: text, split: split}   # optional (caption: `caption`, else `text`)

Relative paths are relative to the registry file.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from m4i_assets.data import corpus as corpus_gen
from m4i_assets.data.coco import read_coco
from m4i_assets.data.huggingface import hf_files, read_huggingface_file
from m4i_assets.data.manifest import MAX_FILE_BYTES, MAX_PIXELS, Ingested, RowRules, read_manifest
from m4i_assets.data.webdataset import read_webdataset_shard

FORMATS = ("manifest", "coco", "webdataset", "huggingface", "embedded")


@dataclass(frozen=True)
class SourceSpec:
    """One dataset: its `name` in `records.dataset`, its `format` and where it is.

    `path`: manifest file(s) (a glob matches several), COCO annotations JSON, tar shards (a glob, or a
    folder of `*.tar`), Hugging Face Parquet files (a glob, or a folder of `*.parquet`) or `save_to_disk`
    folder, or the embedded corpus's folder. `images`: COCO's image folder. `shards`: how
    many slices a COCO file is read in. `max_pixels`, `max_bytes`, `root`, `columns`: the rows' rules
    (`manifest.RowRules`). `corpus`: the embedded generator's spec."""

    name: str
    format: str
    path: str
    images: str = ""
    shards: int = 1
    max_pixels: int = MAX_PIXELS
    max_bytes: int = MAX_FILE_BYTES
    root: str = ""
    columns: dict[str, str] = field(default_factory=dict, hash=False)
    corpus: corpus_gen.CorpusSpec | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("name", "format", "path", "images", "root"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"dataset {self.name!r}: {name} must be a string, not {getattr(self, name)!r}")
        for name in ("shards", "max_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"dataset {self.name!r}: {name} must be a positive integer, not {value!r}")
        if self.format not in FORMATS:
            raise ValueError(f"dataset {self.name!r}: unknown format {self.format!r}; known: {', '.join(FORMATS)}")
        if not self.name or "/" in self.name:
            raise ValueError(f"dataset name {self.name!r} must be non-empty and without '/'")
        if self.format == "coco" and not self.images:
            raise ValueError(f"dataset {self.name!r}: a coco source needs 'images' (the image folder)")
        if self.format == "embedded" and self.corpus is None:
            raise ValueError(f"dataset {self.name!r}: an embedded source needs its corpus spec")
        if not isinstance(self.columns, dict):
            raise ValueError(f"dataset {self.name!r}: columns must be a mapping (record field: column name)")
        try:
            _ = self.rules
        except ValueError as exc:
            raise ValueError(f"dataset {self.name!r}: {exc}") from exc

    @property
    def rules(self) -> RowRules:
        """What this source's rows may be (`manifest.RowRules`)."""
        return RowRules(self.max_pixels, self.max_bytes, Path(self.root) if self.root else None, self.columns)

    def _files(self, pattern: str) -> list[Path]:
        if self.format == "huggingface":
            try:
                files = hf_files(pattern)
            except ValueError as exc:
                raise ValueError(f"dataset {self.name!r}: {exc}") from exc
        else:
            if os.path.isdir(pattern):
                pattern = os.path.join(pattern, "*.tar")
            files = sorted(Path(p) for p in glob.glob(pattern))
        if not files:
            raise FileNotFoundError(f"dataset {self.name!r}: {pattern} matches no file")
        return files

    def shard_ids(self) -> list[str]:
        """The shards this source is read in (file names, or `k-of-n` slices)."""
        if self.format in ("manifest", "webdataset", "huggingface"):
            return [p.name for p in self._files(self.path)]
        if self.format == "coco":
            return [f"{k}-of-{self.shards}" for k in range(self.shards)]
        return ["all"]

    def read(self, shard: str) -> Ingested:
        """Records and rejects of one shard (rows in = records + rejects)."""
        if shard not in self.shard_ids():
            raise ValueError(f"dataset {self.name!r} has no shard {shard!r}")
        if self.format == "manifest":
            (path,) = [p for p in self._files(self.path) if p.name == shard]
            return read_manifest(path, self.name, self.rules)
        if self.format == "webdataset":
            (path,) = [p for p in self._files(self.path) if p.name == shard]
            return read_webdataset_shard(path, self.name, self.rules)
        if self.format == "huggingface":
            (path,) = [p for p in self._files(self.path) if p.name == shard]
            return read_huggingface_file(path, self.name, self.rules)
        if self.format == "coco":
            return read_coco(self.path, self.images, self.name, int(shard.split("-")[0]), self.shards, self.rules)
        manifest = corpus_gen.generate(self.corpus, self.path)  # idempotent: same spec, same bytes
        return read_manifest(manifest, self.name, self.rules)


REGISTRY_KEYS = {f.name for f in fields(SourceSpec)} - {"corpus"}


def registry_entries(path: Path, key: str) -> list:
    """The `key` list of a YAML registry file (empty when the file does not exist); errors name the file."""
    if not path.is_file():
        return []
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    entries = data.get(key, []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a mapping with a {key!r} list")
    return entries


def load_registry(path: str | os.PathLike) -> list[SourceSpec]:
    """The sources listed in a registry file (none when it does not exist); errors name the file."""
    path = Path(path)
    entries = registry_entries(path, "datasets")
    sources = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"name", "format", "path"} <= set(entry):
            raise ValueError(f"{path}: datasets[{i}] needs name, format and path")
        unknown = sorted(set(entry) - REGISTRY_KEYS)
        if unknown or entry["format"] == "embedded":
            raise ValueError(f"{path}: datasets[{i}]: unknown keys {unknown} or format 'embedded' (set by the audit)")
        resolved = {
            k: str(path.parent / v) if k in ("path", "images", "root") and isinstance(v, str) else v
            for k, v in entry.items()
        }
        try:
            sources.append(SourceSpec(**resolved))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: datasets[{i}]: {exc}") from exc
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: dataset names must be unique: {names}")
    return sources


def partition_key(source: SourceSpec, shard: str) -> str:
    return f"{source.name}/{shard}"


def shard_partition_keys(sources: list[SourceSpec]) -> list[str]:
    """Every (source, shard) as a partition key `<dataset>/<shard>`."""
    return [partition_key(s, shard) for s in sources for shard in s.shard_ids()]
