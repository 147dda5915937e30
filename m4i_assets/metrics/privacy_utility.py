"""Privacy-utility evaluation of defenses (README, Defenses): every defended version's attack results
beside its utility on held-out data, relative to the undefended target it defends.

Privacy is read at low FPR (Carlini et al. 2022): a defense's point on the curve is the strongest attack's
TPR at the known non-members' 1% threshold (`PRIVACY`) against the version's utility (one primary utility
metric per model family). The undefended target is the reference point of every curve.
"""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl

from m4i_assets.families import FAMILIES
from m4i_assets.metrics.privacy import stratified_halves

NOT_AN_ATTACK = ("blind_baseline",)  # never queries the model: it measures the data, not the defense
UNDEFENDED = "none"
NAIVE = "naive"  # the attacker who does not know the defense; `adaptive` knows it (defense_facts["attacker"])
PRIVACY = "privacy_tpr"
"""The privacy read of the curves, one rule (README, Rules of evidence): TPR@1%FPR with its bootstrap CI where it is
reported (from 1000 non-members up), else the TPR at the threshold the known non-members' 99% score quantile
fixes, with its Clopper-Pearson CI (`metrics.evaluation.known_threshold`); `privacy_figure` names which. Never
the raw TPR@1%FPR below ten possible false positives."""
REPORTED, KNOWN = "tpr_at_1pct_fpr", "known_threshold_tpr_1pct"
FIGURES = {REPORTED: "TPR@1%FPR", KNOWN: "known 1% threshold"}
KNOWN_THRESHOLD = (
    "tpr_at_1pct_fpr_null_reason",
    "known_threshold_tpr_1pct",
    "known_threshold_tpr_1pct_ci_low",
    "known_threshold_tpr_1pct_ci_high",
    "known_threshold_fpr_1pct",
    "known_threshold_fpr_1pct_ci_low",
    "known_threshold_fpr_1pct_ci_high",
)
REGULARISED = "augmentation"  # the well-regularised reference: "within 10%" is not relative to an overfit target only


def defense_rows(models: pl.DataFrame, metrics: pl.DataFrame, utility: pl.DataFrame, family: str) -> pl.DataFrame:
    """One row per (model version, attack): the defense and its strength (`none` for the undefended target),
    epsilon when DP, AUC and TPR@1%FPR with CIs (NULL below 1000 non-members, with the reason), TPR and realised
    FPR at the known non-members' 1% threshold with Clopper-Pearson CIs, the `PRIVACY` read, the family's primary
    utility, and the utility relative to the target's. `models` holds the target and its defended versions
    (columns model_version, role, defense, defense_strength, defense_facts), `metrics` their `attack_metrics`
    rows, `utility` their `model_utility`."""
    metric = FAMILIES[family].primary_utility
    facts = [json.loads(f) if f else {} for f in models["defense_facts"].to_list()]
    versions = models.select(
        "model_version",
        defense=pl.when(pl.col("role") == "target").then(pl.lit(UNDEFENDED)).otherwise(pl.col("defense")),
        strength=pl.col("defense_strength"),
        epsilon=pl.Series([f.get("dp", {}).get("epsilon") for f in facts], dtype=pl.Float64),
        epsilon_conservative=pl.Series([f.get("dp", {}).get("epsilon_conservative") for f in facts], dtype=pl.Float64),
        epsilon_is_guarantee=pl.Series(
            [f["dp"].get("epsilon_is_guarantee") if "dp" in f else None for f in facts], dtype=pl.Boolean
        ),
        attacker=pl.Series([f.get("attacker", NAIVE) for f in facts], dtype=pl.Utf8),
    )
    value = utility.filter(pl.col("metric") == metric).select(
        "model_version", utility=pl.col("value"),
        utility_chance=pl.col("chance") if "chance" in utility.columns else pl.lit(None, dtype=pl.Float64),
    )  # fmt: skip
    (reference,) = versions.filter(pl.col("defense") == UNDEFENDED).join(value, on="model_version")["utility"]
    regularised = versions.filter(pl.col("defense") == REGULARISED).join(value, on="model_version")["utility"].max()
    metrics = metrics.with_columns(pl.lit(None, dtype=pl.Utf8 if c.endswith("reason") else pl.Float64).alias(c)
                                   for c in KNOWN_THRESHOLD if c not in metrics.columns)  # fmt: skip
    reported = pl.col(REPORTED).is_not_null()
    return (
        versions.join(metrics.filter(~pl.col("attack").is_in(NOT_AN_ATTACK)), on="model_version")
        .join(value, on="model_version", how="left")
        .with_columns(
            pl.when(reported).then(pl.col(f"{REPORTED}{s}")).otherwise(pl.col(f"{KNOWN}{s}")).alias(f"{PRIVACY}{s}")
            for s in ("", "_ci_low", "_ci_high")
        )
        .with_columns(
            privacy_figure=pl.when(reported)
            .then(pl.lit(REPORTED))
            .when(pl.col(KNOWN).is_not_null())
            .then(pl.lit(KNOWN))
        )  # fmt: skip
        .select(
            "defense",
            "strength",
            "epsilon",
            "epsilon_conservative",
            "epsilon_is_guarantee",
            "attacker",
            "attack",
            "auc",
            "auc_ci_low",
            "auc_ci_high",
            "tpr_at_1pct_fpr",
            "tpr_at_1pct_fpr_ci_low",
            "tpr_at_1pct_fpr_ci_high",
            *KNOWN_THRESHOLD,
            PRIVACY,
            f"{PRIVACY}_ci_low",
            f"{PRIVACY}_ci_high",
            "privacy_figure",
            utility_metric=pl.lit(metric),
            utility="utility",
            utility_relative=pl.col("utility") / reference if reference else pl.lit(None, dtype=pl.Float64),
            utility_chance="utility_chance",
            utility_relative_regularised=(
                pl.col("utility") / regularised if regularised else pl.lit(None, dtype=pl.Float64)
            ),
            model_version="model_version",
            mlflow_run_id="mlflow_run_id",
        )  # fmt: skip
        .sort("defense", "strength", "attack", nulls_last=False)
    )


def curve_points(rows: pl.DataFrame) -> pl.DataFrame:
    """Per (defense, strength): the strongest attack's `PRIVACY` figure (`tpr`, its CI and `privacy_figure`; the
    realised FPR on the candidates where it is the known-threshold one; which attack, by which attacker), with
    its utility. Below 1000 non-members, attacks without scores of the known non-members (the shadow-trained
    M^4I classifiers) have no such figure and are not read.
    An adaptive attacker's version and the naive one's are one point, read at the stronger of the two: the
    attacker who knows the defense may also ignore it, so the privacy read is the adaptive one."""
    return (
        rows.sort(PRIVACY, descending=True, nulls_last=True)
        .group_by("defense", "strength", maintain_order=True)
        .first()
        .select(
            "defense",
            "strength",
            "epsilon",
            "model_version",
            "utility",
            "utility_relative",
            *[c for c in ("epsilon_is_guarantee", "utility_chance", "epsilon_lb") if c in rows.columns],
            worst_attack="attack",
            attacker="attacker",
            tpr=PRIVACY,
            tpr_ci_low=f"{PRIVACY}_ci_low",
            tpr_ci_high=f"{PRIVACY}_ci_high",
            figure="privacy_figure",
            fpr=pl.when(pl.col("privacy_figure") == KNOWN).then(pl.col("known_threshold_fpr_1pct")),
            auc="auc",
        )  # fmt: skip
        .sort("defense", "strength")
    )


def best_defense(rows: pl.DataFrame, max_relative_loss: float = 0.10) -> dict | None:
    """The defended version with the lowest worst-case privacy TPR (`PRIVACY`) among those losing at most
    `max_relative_loss` of the target's utility (ties: the higher utility); None when none qualifies."""
    points = curve_points(rows).filter(
        (pl.col("defense") != UNDEFENDED) & (pl.col("utility_relative") >= 1 - max_relative_loss)
    )
    if points.height == 0:
        return None
    return points.sort(["tpr", "utility"], descending=[False, True]).row(0, named=True)


def privacy_utility_png(rows: pl.DataFrame, title: str) -> bytes:
    """Worst-case attack privacy TPR (`PRIVACY`) against utility, one line per defense ordered by strength, the
    undefended target as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve_points(rows).drop_nulls(["utility", "tpr"])  # a point without a privacy figure is not drawn
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for (defense,), group in points.group_by(["defense"], maintain_order=True):
        if defense == UNDEFENDED:
            continue
        group = group.sort("strength")
        ax.plot(group["utility"], group["tpr"], marker="o", label=defense)
        for r in group.iter_rows(named=True):
            ax.annotate(f"{r['strength']:g}", (r["utility"], r["tpr"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))  # fmt: skip
    target = points.filter(pl.col("defense") == UNDEFENDED)
    ax.scatter(target["utility"], target["tpr"], marker="*", s=200, c="k", zorder=5, label="undefended")
    ax.set(
        xlabel=f"utility: {rows['utility_metric'][0]} (held-out)",
        ylabel="worst attack TPR at 1% FPR (PRIVACY rule)",
        title=title,
    )
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ci(row: dict, name: str) -> str:
    if row[name] is None:
        return ""
    return f"{row[name]:.3f} [{row[f'{name}_ci_low']:.3f}, {row[f'{name}_ci_high']:.3f}]"


def defense_markdown(rows: pl.DataFrame) -> str:
    """The curve points as a markdown table: per (defense, strength) the worst attack and its attacker, the
    accountant's epsilon (marked where it is no DP guarantee), the empirical lower bound, and the utility
    beside its chance level."""
    lines = ["| defense | strength | accountant epsilon | empirical epsilon (lower bound) | worst attack | attacker | "
             "worst TPR [95% CI] | read as | realised FPR | AUC | utility | chance | relative |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in curve_points(rows).iter_rows(named=True):
        eps = _fmt(r["epsilon"], ".3g")
        if eps and r.get("epsilon_is_guarantee") is False:
            eps += " (not a guarantee)"
        lines.append(f"| {r['defense']} | {_fmt(r['strength'], 'g')} | {eps} | {_fmt(r.get('epsilon_lb'), '.3f')} | "
                     f"{r['worst_attack']} | {r['attacker']} | {_ci(r, 'tpr')} | {FIGURES.get(r['figure'], '')} | "
                     f"{_fmt(r['fpr'], '.3f')} | "
                     f"{_fmt(r['auc'], '.3f')} | {_fmt(r['utility'], '.4f')} | "
                     f"{_fmt(r.get('utility_chance'), '.4f')} | {_fmt(r['utility_relative'], '.3f')} |")  # fmt: skip
    return "\n".join(lines)


def matched_utility_markdown(points: pl.DataFrame) -> str:
    """`matched_utility` as a markdown table."""
    lines = ["| defense | strength | utility | worst privacy TPR (`PRIVACY`) | best other defense at this utility "
             "| its TPR | most private here |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in matched_utility(points).iter_rows(named=True):
        lines.append(f"| {r['defense']} | {_fmt(r['strength'], 'g')} | {_fmt(r['utility'], '.4f')} | "
                     f"{_fmt(r['tpr'], '.3f')} | {r['frontier_defense'] or ''} | "
                     f"{_fmt(r['frontier_tpr'], '.3f')} | {'yes' if r['on_frontier'] else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def interpolate_tpr(curve: pl.DataFrame, utility: float) -> float | None:
    """One defense's worst-attack privacy TPR (`PRIVACY`) at `utility`, linear between its two strengths that bracket it
    (None outside the utilities its strengths reach: no extrapolation)."""
    curve = curve.drop_nulls(["utility", "tpr"]).sort("utility")
    if curve.height == 0:
        return None
    u, t = curve["utility"].to_numpy(), curve["tpr"].to_numpy()
    if utility < u[0] or utility > u[-1]:
        return None
    return float(np.interp(utility, u, t))


def tpr_at_utility(curve: pl.DataFrame, utility: float) -> float | None:
    """One defense's worst-attack privacy TPR (`PRIVACY`) while keeping at least `utility`: the lower of its curve
    read at `utility` (`interpolate_tpr`) and its measured points of more utility (a strength that keeps more
    utility and leaks less serves any lower utility: the Pareto reading); None when no strength reaches it."""
    curve = curve.drop_nulls(["utility", "tpr"])
    kept = curve.filter(pl.col("utility") >= utility)["tpr"]
    if kept.len() == 0:
        return None
    at = interpolate_tpr(curve, utility)
    return float(kept.min()) if at is None else min(at, float(kept.min()))


def defense_curves(points: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Each defense's privacy-utility curve (`curve_points` rows of its strengths), anchored at the undefended
    target: strength zero of every defense is the target itself, so a defense evaluated at one strength still has
    a segment (from the target to that strength) on which other defenses can be compared at matched utility.
    Between two points the curve is read linearly, never above its most useful point (`tpr_at_utility`)."""
    target = points.filter(pl.col("defense") == UNDEFENDED).select("utility", "tpr")
    return {
        d: pl.concat([g.select("utility", "tpr"), target])
        for (d,), g in points.filter(pl.col("defense") != UNDEFENDED).group_by(["defense"], maintain_order=True)
    }


def matched_utility(points: pl.DataFrame) -> pl.DataFrame:
    """The frontier at matched utility: for each defended point (a `curve_points` row), every other defense's
    worst-attack privacy TPR (`PRIVACY`) at that point's utility or more on its anchored curve (`defense_curves`,
    `tpr_at_utility`), and the lowest of them
    (`frontier_tpr`, by `frontier_defense`). A point whose own TPR is at or below the frontier is the most private
    at its utility; comparing at one strength each would set a defense that kept less utility against one that
    kept more."""
    defended = points.filter(pl.col("defense") != UNDEFENDED)
    curves = defense_curves(points)
    rows = []
    for r in defended.iter_rows(named=True):
        others = {d: tpr_at_utility(g, r["utility"]) for d, g in curves.items() if d != r["defense"]}
        others = {d: t for d, t in others.items() if t is not None}
        best = min(others, key=others.get) if others else None
        rows.append({
            "defense": r["defense"], "strength": r["strength"], "utility": r["utility"],
            "tpr": r["tpr"], "frontier_defense": best,
            "frontier_tpr": others.get(best) if best else None,
            "on_frontier": best is None or r["tpr"] <= others[best],
        })  # fmt: skip
    schema = {"defense": pl.Utf8, "strength": pl.Float64, "utility": pl.Float64, "tpr": pl.Float64,
              "frontier_defense": pl.Utf8, "frontier_tpr": pl.Float64, "on_frontier": pl.Boolean}  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def best_at_utility(points: pl.DataFrame, utility: float) -> dict | None:
    """The defense whose curve is lowest (worst-attack privacy TPR (`PRIVACY`) keeping at least `utility`,
    `tpr_at_utility`) at `utility`, with that TPR; None when no defense's strengths reach that utility."""
    at = {d: tpr_at_utility(g, utility) for d, g in defense_curves(points).items()}
    at = {d: t for d, t in at.items() if t is not None}
    if not at:
        return None
    best = min(at, key=at.get)
    return {"defense": best, "utility": utility, "tpr": at[best]}


def best_at_matched_utility(points: pl.DataFrame) -> dict[str, dict | None]:
    """`best_at_utility` at 90% of the undefended target's utility and at 90% of the augmentation-defended
    (well-regularised) version's, so "within 10%" is not relative to an overfit target only."""
    reference = points.filter(pl.col("defense") == UNDEFENDED)["utility"][0]
    regularised = points.filter(pl.col("defense") == REGULARISED)["utility"].max()
    return {
        "at 90% of the undefended target's utility": best_at_utility(points, 0.9 * reference),
        "at 90% of the regularised (augmentation) version's": (
            best_at_utility(points, 0.9 * regularised) if regularised else None),
    }  # fmt: skip


def worst_attack_heldout(
    labels: np.ndarray, scores: dict[str, np.ndarray], metric, seed: int = 0
) -> dict[str, float | str]:
    """The strongest attack without the upward bias of a max over noisy estimates: on a seeded stratified split,
    the attack with the best `metric(labels, scores)` on one half is measured on the other, both ways, and the
    two measurements averaged. Returns the attack picked on each half and the held-out value."""
    labels = np.asarray(labels, dtype=bool)
    if not scores:
        raise ValueError("need at least one attack's scores")
    half, other = stratified_halves(labels, seed)
    picked, measured = [], []
    for select, measure in ((half, other), (other, half)):
        name = max(sorted(scores), key=lambda a: metric(labels[select], np.asarray(scores[a])[select]))
        picked.append(name)
        measured.append(metric(labels[measure], np.asarray(scores[name])[measure]))
    return {"attack_first_half": picked[0], "attack_second_half": picked[1], "value": float(np.mean(measured))}
