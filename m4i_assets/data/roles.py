"""Role assignment: disjoint, seeded sets of records for one controlled audit.

- `member`: the target model's training data.
- `nonmember`: held out from the same distribution; with the members, the *candidates* every attack
  scores (is_member is exact ground truth).
- `known_nonmember`: non-members the attacker is allowed to know (WSA, Ko et al. 2023).
- `population`: data no candidate overlaps, for null-control and reference models (section 4) and
  the attacker's shadow models (section 2). A second dataset's records are all population.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

ROLES = ("member", "nonmember", "known_nonmember", "population")


@dataclass(frozen=True)
class RoleSpec:
    n_members: int = 500
    n_nonmembers: int = 500
    n_known_nonmembers: int = 500
    seed: int = 0


def assign_roles(record_ids: list[str], spec: RoleSpec, nonmember_ids: list[str] | None = None) -> pl.DataFrame:
    """Shuffle `record_ids` with `spec.seed` and cut them into the four roles (population = the rest).

    With `nonmember_ids`, the non-members are a seeded sample of those instead (a deliberately
    shifted set) and `record_ids` supply the other roles. The input order does not matter (ids are
    sorted first), so the same records give the same roles.
    """
    ids = np.array(sorted(record_ids))
    rng = np.random.default_rng(spec.seed)
    sizes = {"member": spec.n_members, "nonmember": spec.n_nonmembers, "known_nonmember": spec.n_known_nonmembers}
    shifted = np.array([], dtype=str)
    if nonmember_ids is not None:
        pool = np.array(sorted(nonmember_ids))
        if len(pool) < spec.n_nonmembers:
            raise ValueError(f"need {spec.n_nonmembers} non-members but the shifted pool has {len(pool)}")
        shifted = rng.choice(pool, spec.n_nonmembers, replace=False)
        sizes["nonmember"] = 0
    need = sum(sizes.values())
    if need >= len(ids):
        raise ValueError(f"role sizes need {need} records plus a population, but only {len(ids)} records are usable")
    order = rng.permutation(len(ids))
    roles = np.empty(len(ids), dtype=object)
    for role, chunk in zip(ROLES, np.split(order, np.cumsum(list(sizes.values())))):
        roles[chunk] = role
    ids, roles = np.r_[ids, shifted], np.r_[roles, np.full(len(shifted), "nonmember", dtype=object)]
    return pl.DataFrame({"record_id": ids, "role": roles.astype(str), "is_member": roles == "member"}).sort("record_id")


def controlled_roles(
    audit: str,
    main: tuple[str, list[str]],
    spec: RoleSpec,
    shifted: tuple[str, list[str]] | None = None,
    second: tuple[str, list[str]] | None = None,
) -> pl.DataFrame:
    """The `record_roles` rows of a controlled audit from its datasets, each (name, record ids): the roles of the
    `main` dataset (`assign_roles`), its non-members drawn from the `shifted` dataset when given (the shift
    gate's demonstration), and every record of the `second` caption domain a population record (the shadow
    captioners' data) unless the main dataset holds it already; each row with the dataset it comes from."""
    roles = assign_roles(main[1], spec, shifted[1] if shifted else None).with_columns(dataset=pl.lit(main[0]))
    if shifted:  # the non-members were drawn from the shifted corpus
        from_shifted = pl.col("record_id").is_in(shifted[1]) & (pl.col("role") == "nonmember")
        roles = roles.with_columns(dataset=pl.when(from_shifted).then(pl.lit(shifted[0])).otherwise("dataset"))
    if second:
        other = pl.DataFrame({"record_id": second[1], "role": "population", "is_member": False, "dataset": second[0]},
                             schema_overrides={"record_id": pl.String})  # fmt: skip
        roles = pl.concat([roles, other.join(roles, on="record_id", how="anti")]).sort("record_id")
    return roles.with_columns(audit=pl.lit(audit))


def shadow_split(population_ids: list[str], seed: int) -> tuple[list[str], list[str]]:
    """A shadow model's known members and non-members: a seeded half of the population and the rest
    (M^4I's attacker data, disjoint from every candidate; Hu et al. 2022), both sorted."""
    ids = np.array(sorted(population_ids))
    members = np.zeros(len(ids), dtype=bool)
    members[np.random.default_rng(seed).permutation(len(ids))[: len(ids) // 2]] = True
    return ids[members].tolist(), ids[~members].tolist()
