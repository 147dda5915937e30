"""The audit registry (`$M4I_HOME/audits.yaml`): audits of users' models with membership from users' data.

    audits:
      - name: acme-clip-v3            # the audit's id in every table
        family: clip                  # clip | captioner
        dataset: acme_pairs           # a source of datasets.yaml
        roles:                        # membership from the data: a column's value for each role
          column: split               # records.split, or a key of records.metadata
          member: member              # one value or a list
          nonmember: nonmember
          known_nonmember: known_nonmember   # optional
          population: population             # optional
          candidate: candidate               # optional: unknown membership (an unlabelled audit)
        sample: {member: 5000, nonmember: 5000}   # optional, seeded
        targets:
          - path: models/acme-clip-v3           # file or directory; `arch:` for an open_clip weights file
        null_control: models/acme-clip-base     # optional
        references: [models/ref-0, models/ref-1] # optional
        attacks: [csa, aea, wsa, blind_baseline] # optional; default: every attack the audit can run

Kinds (README, Rules of evidence): *labelled* (members and non-members given: every metric), *unlabelled*
(`candidate` and `known_nonmember` only: scores, exposure ranks and an estimated membership rate, no AUC)
and *controlled* (no registry entry: the platform draws the roles and trains every model).

Roles come from the data: a record takes the role whose value its column holds. Records that share an
image take one role (for captioners membership is per image); an empty role, a value in two roles, a
value that matches no record, or an image whose records hold two roles is an error naming the audit and
the column. Relative paths are relative to the registry file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from m4i_assets.data.sources import registry_entries

FAMILIES = ("clip", "captioner")
ROLE_KEYS = ("member", "nonmember", "known_nonmember", "population", "candidate")
# Each attack of a family and what an audit must have for it; `labels`: members and non-members. An attack is
# planned from what the audit has, never from who trained the model: the captioner's white-box likelihood needs
# only the checkpoint, the contrastive loss the known non-members as its negatives.
ATTACK_NEEDS: dict[str, dict[str, tuple[str, ...]]] = {
    "clip": {
        "csa": (),
        "aea": (),
        "clip_loss": ("known_nonmember",),
        "rmia": ("known_nonmember", "references"),
        "wsa": ("known_nonmember",),
        "ref_calibrated": ("references",),
        "blind_baseline": ("labels",),
    },
    "captioner": {
        "m4i_mb": ("population",),
        "m4i_fb": ("population",),
        "m4i_loss": (),
        "m4i_loss_ref": ("population",),
        "blind_baseline": ("labels",),
    },
}
NEED_REASONS = {
    "known_nonmember": "the audit names no known non-members (roles.known_nonmember)",
    "references": "the audit names no reference models (references:)",
    "labels": "the audit has no members and non-members: a classifier of them cannot be trained",
    "population": "the audit has no population records (roles.population) to train shadow captioners on",
}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint the audit registers: a file or directory, and the open_clip arch of a weights file."""

    path: str
    arch: str = ""


@dataclass(frozen=True)
class AuditSpec:
    """One entry of the audit registry (see the module docstring)."""

    name: str
    family: str
    dataset: str
    column: str
    values: dict[str, tuple[str, ...]]
    targets: tuple[Checkpoint, ...]
    sample: dict[str, int] = field(default_factory=dict, hash=False)
    null_control: Checkpoint | None = None
    references: tuple[Checkpoint, ...] = ()
    attacks: tuple[str, ...] | None = None

    @property
    def kind(self) -> str:
        return "labelled" if "member" in self.values else "unlabelled"

    @property
    def candidate_roles(self) -> tuple[str, ...]:
        """The roles every attack scores: members and non-members, or the candidates."""
        return ("member", "nonmember") if self.kind == "labelled" else ("candidate",)

    def has(self, need: str) -> bool:
        if need == "labels":
            return self.kind == "labelled"
        if need == "references":
            return bool(self.references)
        return need in self.values

    def plan(self) -> list[dict[str, str]]:
        """Every attack of the family: `run`, or `skipped` with the reason (what the audit lacks, or not
        listed in `attacks:`)."""
        rows = []
        for attack, needs in ATTACK_NEEDS[self.family].items():
            missing = [n for n in needs if not self.has(n)]
            if missing:
                rows.append({"attack": attack, "status": "skipped", "reason": NEED_REASONS[missing[0]]})
            elif self.attacks is not None and attack not in self.attacks:
                rows.append({"attack": attack, "status": "skipped", "reason": "not listed in the audit's attacks"})
            else:
                rows.append({"attack": attack, "status": "run", "reason": ""})
        return rows

    def planned(self) -> list[str]:
        return [r["attack"] for r in self.plan() if r["status"] == "run"]


def _values(audit: str, key: str, raw) -> tuple[str, ...]:
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(isinstance(v, str | int | float | bool) for v in values):
        raise ValueError(f"audit {audit!r}: roles.{key} must be a value or a list of values")
    return tuple(str(v).lower() if isinstance(v, bool) else str(v) for v in values)


def _checkpoint(audit: str, base: Path, raw, what: str) -> Checkpoint:
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str) or set(raw) - {"path", "arch"}:
        raise ValueError(f"audit {audit!r}: {what} must be a path or {{path: ..., arch: ...}}")
    return Checkpoint(str(base / raw["path"]), str(raw.get("arch") or ""))


def parse_audit(entry: dict, base: Path) -> AuditSpec:
    """One registry entry as an AuditSpec; a ValueError naming the audit and the key for a bad one."""
    name = entry.get("name")
    if not isinstance(name, str) or not name or "/" in name or "@" in name:
        raise ValueError(f"audit name {name!r} must be a non-empty string without '/' or '@'")
    known = {"name", "family", "dataset", "roles", "sample", "targets", "null_control", "references", "attacks"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"audit {name!r}: unknown keys {unknown}")
    family = entry.get("family")
    if family not in FAMILIES:
        raise ValueError(f"audit {name!r}: family must be one of {', '.join(FAMILIES)}, not {family!r}")
    if not isinstance(entry.get("dataset"), str):
        raise ValueError(f"audit {name!r}: dataset must name a source of the dataset registry")
    roles = entry.get("roles")
    if not isinstance(roles, dict) or not isinstance(roles.get("column"), str):
        raise ValueError(f"audit {name!r}: roles must be a mapping with a column")
    unknown = sorted(set(roles) - {"column", *ROLE_KEYS})
    if unknown:
        raise ValueError(f"audit {name!r}: roles has unknown keys {unknown}; known: column, {', '.join(ROLE_KEYS)}")
    values = {k: _values(name, k, roles[k]) for k in ROLE_KEYS if roles.get(k) is not None}
    labelled, unlabelled = {"member", "nonmember"} <= set(values), "candidate" in values
    if labelled == unlabelled or ("member" in values) != ("nonmember" in values):
        raise ValueError(
            f"audit {name!r}: roles (column {roles['column']!r}) need member and nonmember (a labelled audit) or "
            "candidate (an unlabelled audit), not both"
        )
    if unlabelled and "known_nonmember" not in values:
        raise ValueError(
            f"audit {name!r}: an unlabelled audit needs roles.known_nonmember (column {roles['column']!r})"
        )
    seen: dict[str, str] = {}
    for role, vals in values.items():
        for v in vals:
            if v in seen:
                raise ValueError(
                    f"audit {name!r}: value {v!r} of column {roles['column']!r} is given to two roles, "
                    f"{seen[v]} and {role}: one record would be in two roles"
                )
            seen[v] = role
    sample = entry.get("sample") or {}
    if not isinstance(sample, dict) or not all(k in values and isinstance(n, int) and n > 0 for k, n in sample.items()):
        raise ValueError(f"audit {name!r}: sample must map roles of the audit to positive counts: {sample}")
    targets = entry.get("targets")
    if not isinstance(targets, list) or not targets:
        raise ValueError(f"audit {name!r}: targets must list at least one checkpoint")
    attacks = entry.get("attacks")
    if attacks is not None:
        known_attacks = ATTACK_NEEDS[family]
        if not isinstance(attacks, list) or not set(attacks) <= set(known_attacks):
            raise ValueError(f"audit {name!r}: attacks must be a list of {', '.join(known_attacks)}: {attacks}")
    references = entry.get("references") or []
    if not isinstance(references, list):
        raise ValueError(f"audit {name!r}: references must be a list of checkpoints")
    return AuditSpec(
        name=name,
        family=family,
        dataset=entry["dataset"],
        column=roles["column"],
        values=values,
        targets=tuple(_checkpoint(name, base, t, "each target") for t in targets),
        sample=dict(sample),
        null_control=_checkpoint(name, base, entry["null_control"], "null_control")
        if entry.get("null_control")
        else None,
        references=tuple(_checkpoint(name, base, r, "each reference") for r in references),
        attacks=tuple(attacks) if attacks is not None else None,
    )


def load_audits(path: str | os.PathLike) -> list[AuditSpec]:
    """The audits of a registry file (none when it does not exist); errors name the file."""
    path = Path(path)
    entries = registry_entries(path, "audits")
    if not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{path}: every entry of 'audits' must be a mapping")
    try:
        audits = [parse_audit(entry, path.parent) for entry in entries]
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    names = [a.name for a in audits]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: audit names must be unique: {names}")
    return audits


def role_column(records: pl.DataFrame, column: str) -> pl.Series:
    """The value of `column` for each record: `records.split` for "split", else the metadata key."""
    if column == "split":
        return records["split"]

    def value(metadata: str | None) -> str | None:
        try:
            found = json.loads(metadata).get(column) if metadata else None
        except (ValueError, AttributeError):
            return None
        if found is None:
            return None
        return str(found).lower() if isinstance(found, bool) else str(found)

    return pl.Series(column, [value(m) for m in records["metadata"].to_list()], dtype=pl.Utf8)


def roles_from_data(records: pl.DataFrame, spec: AuditSpec, seed: int) -> pl.DataFrame:
    """`record_roles` rows of a labelled or unlabelled audit from its dataset's records (record_id, dataset,
    image_uri, split, metadata): the role whose values hold the record's column; `is_member` true for
    members, NULL for candidates, else false. `sample` keeps a seeded share of a role's images."""
    where = f"audit {spec.name!r}, column {spec.column!r}"
    value = role_column(records, spec.column)
    role_of = {v: role for role, vals in spec.values.items() for v in vals}
    frame = records.select("record_id", "dataset", "image_uri").with_columns(
        role=value.replace_strict(role_of, default=None, return_dtype=pl.Utf8)
    )
    present = set(value.drop_nulls().to_list())
    for role, vals in spec.values.items():
        unmatched = [v for v in vals if v not in present]
        if unmatched:
            raise ValueError(f"{where}: the {role} value(s) {unmatched} match no record of {spec.dataset!r}")
    frame = frame.filter(pl.col("role").is_not_null())
    mixed = frame.group_by("image_uri").agg(pl.col("role").unique()).filter(pl.col("role").list.len() > 1)
    if mixed.height:
        example = mixed.row(0, named=True)
        raise ValueError(
            f"{where}: {mixed.height} image(s) have records in two roles (e.g. {example['image_uri']}: "
            f"{sorted(example['role'])}); records that share an image must share a role"
        )
    doubled = frame.group_by("record_id").agg(pl.col("role").unique()).filter(pl.col("role").list.len() > 1)
    if doubled.height:
        raise ValueError(f"{where}: record {doubled['record_id'][0]} is in two roles {sorted(doubled['role'][0])}")
    frame = frame.unique("record_id", keep="first")
    rng = np.random.default_rng(seed)
    for role, n in sorted(spec.sample.items()):
        images = np.array(sorted(set(frame.filter(pl.col("role") == role)["image_uri"])))
        if n < len(images):
            kept = set(rng.choice(images, n, replace=False).tolist())
            frame = frame.filter((pl.col("role") != role) | pl.col("image_uri").is_in(kept))
    counts = frame.group_by("role").len()
    for role in spec.values:
        if role not in counts["role"].to_list():
            raise ValueError(f"{where}: role {role} has no records")
    is_member = pl.when(pl.col("role") == "candidate").then(None).otherwise(pl.col("role") == "member")
    return frame.select("record_id", "role", is_member.alias("is_member"), "dataset").sort("record_id")
