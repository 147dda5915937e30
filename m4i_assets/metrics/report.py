"""The audit's comparison report: every attack with CIs, the paired comparisons with CSA and with the blind
baseline, and the verdicts that keep an audit honest (README, Rules of evidence): no distribution shift between
members and non-members (the blind baseline at chance, known non-members like candidate non-members), which
attacks beat the blind baseline (Das et al. 2024) and CSA by paired CIs, and the label-permutation test."""

import numpy as np

from m4i_assets.metrics.evaluation import FPR_BOUNDS

BLIND = "blind_baseline"
CSA = "csa"
BASELINES = (CSA, BLIND)
METRIC_LABELS = {"auc": "AUC", "tpr_at_1pct_fpr": "TPR@1%FPR", "tpr_at_0_1pct_fpr": "TPR@0.1%FPR"}


def ci_text(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "NULL"
    return f"{row[key]:.3f} [{row[key + '_ci_low']:.3f}, {row[key + '_ci_high']:.3f}]"


def metrics_markdown(rows: list[dict]) -> str:
    """One markdown table row per attack (rows are `attack_metrics` rows); NULL low-FPR figures with their
    reason below, and TPR / realised FPR at the known non-members' 1% threshold with Clopper-Pearson CIs."""
    lines = [
        "| attack | n mem / non | AUC [95% CI] | bal. acc | TPR@1%FPR [CI] | TPR@0.1%FPR [CI] "
        "| at known non-members' 1% threshold: TPR [CP CI] / FPR [CP CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        known = "NULL"
        if r.get("known_threshold_tpr_1pct") is not None:
            known = f"{ci_text(r, 'known_threshold_tpr_1pct')} / {ci_text(r, 'known_threshold_fpr_1pct')}"
        lines.append(
            f"| {r['attack']} | {r['n_members']} / {r['n_nonmembers']} | {ci_text(r, 'auc')} "
            f"| {r['balanced_accuracy']:.3f} | {ci_text(r, 'tpr_at_1pct_fpr')} | {ci_text(r, 'tpr_at_0_1pct_fpr')} "
            f"| {known} |"
        )
    reasons = {r.get(f"{m}_null_reason") for r in rows for m in FPR_BOUNDS} - {None}
    lines += [f"\nNULL: {reason}." for reason in sorted(reasons)]
    return "\n".join(lines)


def comparisons_markdown(comparisons: list[dict]) -> str:
    """The paired differences (rows of `attack_comparisons`) as a table: attack, baseline, metric, CI."""
    lines = ["| attack | baseline | metric | difference [paired 95% CI] |", "|---|---|---|---|"]
    for c in sorted(comparisons, key=lambda c: (c["baseline"], c["attack"], c["metric"])):
        lines.append(f"| {c['attack']} | {c['baseline']} | {METRIC_LABELS.get(c['metric'], c['metric'])} "
                     f"| {c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] |")  # fmt: skip
    return "\n".join(lines)


def _outside(row: dict, margin: float) -> bool:
    """Whether an AUC CI lies above 0.5 by more than `margin`. Only this side is evidence of shift: out-of-fold
    scores of a classifier fitted to noise are biased below chance on small samples (anti-learning; 0.22 [0.11,
    0.31] on 32 + 32 noise records), which no attacker can exploit, so a CI below 0.5 is reported, not gated."""
    return row["auc_ci_low"] > 0.5 + margin


def _below(row: dict, margin: float) -> str:
    return (
        (
            f" (below chance by more than {margin}: the out-of-fold bias of a small sample, not a shift an attacker "
            "could use; comparisons against it flatter the attacks)"
        )
        if row["auc_ci_high"] < 0.5 - margin
        else ""
    )


def shift_verdict(rows: list[dict], margin: float, known_vs_candidates: dict | None = None) -> tuple[bool, str]:
    """(passed, message) of the shift gate: it fails when the blind baseline's AUC CI lies above 0.5 by more
    than `margin`, or when a blind classifier tells the known non-members from the candidate non-members
    (their AUC CI above 0.5 by more than `margin`: WSA and the known-threshold figures assume they are
    alike)."""
    blind = next((r for r in rows if r["attack"] == BLIND), None)
    if blind is None:
        return False, "no blind baseline was scored, so distribution shift was not ruled out"
    problems = []
    if _outside(blind, margin):
        problems.append(f"the blind baseline's AUC {ci_text(blind, 'auc')} lies above 0.5 by more than {margin}: the "
                        "member and non-member sets differ in distribution, so attack AUCs measure that shift "
                        "rather than membership")  # fmt: skip
    if known_vs_candidates is not None and _outside(known_vs_candidates, margin):
        problems.append(f"a blind classifier tells known non-members from candidate non-members (AUC "
                        f"{ci_text(known_vs_candidates, 'auc')}): thresholds fixed on the known non-members do "
                        "not transfer")  # fmt: skip
    if problems:
        return False, "shift gate FAILED: " + "; ".join(problems) + ". Draw every set from one distribution."
    known = (
        ""
        if known_vs_candidates is None
        else (f", known vs candidate non-members {ci_text(known_vs_candidates, 'auc')}")
    )
    return True, (
        f"shift gate passed: blind baseline AUC {ci_text(blind, 'auc')}{_below(blind, margin)}{known}, "
        f"not above 0.5 + {margin}"
    )


def _comparison(comparisons: list[dict], attack: str, baseline: str, metric: str) -> dict | None:
    return next((c for c in comparisons if (c["attack"], c["baseline"], c["metric"]) == (attack, baseline, metric)),
                None)  # fmt: skip


def diff_text(c: dict) -> str:
    return f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"


def best_attack(rows: list[dict]) -> dict | None:
    """The attack (not the blind baseline) with the highest AUC."""
    attacks = [r for r in rows if r["attack"] != BLIND]
    return max(attacks, key=lambda r: r["auc"]) if attacks else None


def beats_blind_verdict(rows: list[dict], comparisons: list[dict]) -> tuple[bool, str]:
    """(passed, message): leakage is shown only where the paired CI of (best attack AUC - blind AUC) lies
    above 0 (Das et al. 2024)."""
    best = best_attack(rows)
    c = best and _comparison(comparisons, best["attack"], BLIND, "auc")
    if c is None:
        return False, "no attack was compared with the blind baseline"
    if c["ci_low"] > 0:
        return True, f"{best['attack']} beats the blind baseline: AUC difference {diff_text(c)} lies above 0"
    return False, (f"no attack beats the blind baseline: the best, {best['attack']}, has AUC difference "
                   f"{diff_text(c)}, which does not lie above 0, so no membership leakage is shown")  # fmt: skip


def null_control_verdict(role: str, rows: list[dict]) -> tuple[bool, str, list[str]]:
    """(passed, message, attacks off chance): on a null control, which never saw a candidate (the rules
    of evidence), every attack's AUC CI must contain 0.5; other roles pass."""
    if role != "null_control":
        return True, f"applies to null controls only; this is a {role}", []
    off = [f"{r['attack']} {ci_text(r, 'auc')}" for r in rows if not r["auc_ci_low"] <= 0.5 <= r["auc_ci_high"]]
    return not off, "every attack's AUC CI contains 0.5" if not off else f"AUC CI excludes 0.5: {', '.join(off)}", off


def compare_to(comparisons: list[dict], baseline: str) -> list[str]:
    """Per attack, how it compares with `baseline` by paired bootstrap CIs of the differences."""
    lines = []
    for attack in sorted({c["attack"] for c in comparisons if c["baseline"] == baseline} - {BLIND}):
        parts = []
        for metric in ("auc", *FPR_BOUNDS):
            c = _comparison(comparisons, attack, baseline, metric)
            if c is None:
                continue
            word = "better" if c["ci_low"] > 0 else "worse" if c["ci_high"] < 0 else "not told apart"
            parts.append(f"{METRIC_LABELS[metric]} {diff_text(c)} ({word})")
        if parts:
            lines.append(f"- {attack} vs {baseline}: " + "; ".join(parts))
    return lines


def verdict_lines(
    rows: list[dict], comparisons: list[dict], margin: float, known_vs_candidates: dict | None = None,
    permutation: dict | None = None,
) -> list[str]:  # fmt: skip
    """Plain statements under the table: paired comparisons with CSA and the blind baseline, the shift gate,
    whether any attack beats the blind baseline, attacks at chance, and the permutation test."""
    at_chance = [r["attack"] for r in rows if r["auc_ci_low"] <= 0.5 <= r["auc_ci_high"]]
    lines = [*compare_to(comparisons, CSA)]
    for metric in ("auc", "tpr_at_1pct_fpr") if any(r["attack"] == CSA for r in rows) else ():  # CLIP attack
        judged = [c for c in comparisons if c["baseline"] == CSA and c["metric"] == metric and c["attack"] != BLIND]
        beats = sorted(c["attack"] for c in judged if c["ci_low"] > 0)
        verdict = (", ".join(beats) or "none") if judged else "not judged (the figure is NULL at this many non-members)"
        lines.append(f"- beat CSA in {METRIC_LABELS[metric]} (paired CI above 0): {verdict}")
    lines += [
        *compare_to(comparisons, BLIND),
        f"- {shift_verdict(rows, margin, known_vs_candidates)[1]}",
        f"- {beats_blind_verdict(rows, comparisons)[1]}",
        f"- AUC CI contains 0.5 (no detectable leakage): {', '.join(at_chance) or 'none'}",
    ]
    if permutation:
        lines.append(f"- label permutation test of {permutation['attack']}: AUC {permutation['auc']:.3f}, "
                     f"p = {permutation['p_value']:.4f} over {permutation['n_permutations']} permutations "
                     f"(permuted AUCs 95% within [{permutation['null_auc_q025']:.3f}, "
                     f"{permutation['null_auc_q975']:.3f}])")  # fmt: skip
    return lines


def audit_report(
    title: str, rows: list[dict], comparisons: list[dict], margin: float, known_vs_candidates: dict | None = None,
    permutation: dict | None = None,
) -> str:  # fmt: skip
    """The whole comparison report as markdown."""
    return "\n".join([
        f"# {title}", "", metrics_markdown(rows), "", "## Paired comparisons (one bootstrap for all attacks)", "",
        comparisons_markdown(comparisons), "", *verdict_lines(rows, comparisons, margin, known_vs_candidates,
                                                               permutation),
    ])  # fmt: skip


def _num(value, spread=None) -> str:
    if value is None:
        return "NULL"
    return f"{value:.3f}" if spread is None else f"{value:.3f} +- {spread:.3f}"


def scenarios_markdown(rows: list[dict]) -> str:
    """The M^4I scenario table as markdown (rows are `m4i_scenarios` rows); with several shadow seeds, the
    mean and standard deviation over seeds beside the (first seed's) bootstrap CI."""
    lines = ["| attack | scenario | shadow (dataset, arch) | seeds | AUC [95% CI] | AUC mean +- sd over seeds "
             "| TPR@1%FPR [CI] | attack success rate |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        n_seeds = r.get("n_seeds") or 1
        spread = _num(r.get("auc_seed_mean"), r.get("auc_seed_std")) if n_seeds > 1 else "unmeasured (1 seed)"
        lines.append(
            f"| {r['attack']} | {r['scenario']} | {r['shadow_dataset']}, {r['shadow_arch']} | {n_seeds} "
            f"| {ci_text(r, 'auc')} | {spread} | {ci_text(r, 'tpr_at_1pct_fpr')} | {_num(r['attack_success_rate'])} |"
        )
    return "\n".join(lines)


def extractors_markdown(extractors: dict[str, dict]) -> str:
    """Each shadow's MFE retrieval quality on its held-out pairs (`attacks.m4i.retrieval_quality`) as markdown:
    an FB attack is only as good as the extractor whose features it classifies."""
    header = "| shadow | held-out pairs | MFE image-to-text recall@1 (chance) | recall@5 (chance) |"
    lines = [header, "|---|---|---|---|"]
    for shadow, q in extractors.items():
        cells = [f"{_num(q.get(f'recall@{k}'))} ({_num(q.get(f'chance@{k}'))})" for k in (1, 5)]
        lines.append(f"| {shadow} | {q.get('n_pairs', 'n/a')} | {' | '.join(cells)} |")
    return "\n".join(lines)


def seed_spread(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, standard deviation) of one figure over training seeds: the mean is None if any seed's figure is
    NULL, the standard deviation also with a single seed (the spread is unmeasured)."""
    if any(v is None for v in values):
        return None, None
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def target_seed_spread(rows: list[dict]) -> list[dict]:
    """Training variance of the headline (README, Rules of evidence): per attack, the mean and standard deviation
    of AUC and TPR@1%FPR over the `attack_metrics` rows of targets trained on the same members with other
    seeds (`target_seeds`); the standard deviations are None with one seed (unmeasured)."""
    by_attack: dict[str, list[dict]] = {}
    for r in rows:
        by_attack.setdefault(r["attack"], []).append(r)
    out = []
    for attack, group in sorted(by_attack.items()):
        row = {"attack": attack, "n_seeds": len(group)}
        for metric in ("auc", "tpr_at_1pct_fpr"):
            row[f"{metric}_seed_mean"], row[f"{metric}_seed_std"] = seed_spread([r[metric] for r in group])
        out.append(row)
    return out


def target_spread_markdown(spread: list[dict]) -> str:
    """`target_seed_spread` as markdown, saying plainly when the spread is unmeasured."""
    if not spread or spread[0]["n_seeds"] < 2:
        return "Spread over target training seeds: unmeasured (1 target seed; set `target_seeds` > 1)."
    lines = [f"Spread over {spread[0]['n_seeds']} target training seeds (same members, another seed each):", "",
             "| attack | seeds | AUC mean +- sd | TPR@1%FPR mean +- sd |", "|---|---|---|---|"]  # fmt: skip
    for r in spread:
        lines.append(f"| {r['attack']} | {r['n_seeds']} | {_num(r['auc_seed_mean'], r['auc_seed_std'])} "
                     f"| {_num(r['tpr_at_1pct_fpr_seed_mean'], r['tpr_at_1pct_fpr_seed_std'])} |")  # fmt: skip
    return "\n".join(lines)
