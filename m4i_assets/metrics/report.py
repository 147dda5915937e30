"""The audit's comparison report: every attack with CIs, how each compares with CSA at low FPR,
and the verdicts that keep an audit honest (ATTACKS.md section 4): is the blind baseline at chance
(no distribution shift), and which attacks cannot be told from chance."""

BLIND = "blind_baseline"
CSA = "csa"


def ci_text(row: dict, key: str) -> str:
    return f"{row[key]:.3f} [{row[key + '_ci_low']:.3f}, {row[key + '_ci_high']:.3f}]"


def metrics_markdown(rows: list[dict]) -> str:
    """One markdown table row per attack (rows are `attack_metrics` rows)."""
    lines = [
        "| attack | n mem / non | AUC [95% CI] | bal. acc | TPR@1%FPR [CI] | TPR@0.1%FPR [CI] |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {r['n_members']} / {r['n_nonmembers']} | {ci_text(r, 'auc')} "
            f"| {r['balanced_accuracy']:.3f} | {ci_text(r, 'tpr_at_1pct_fpr')} | {ci_text(r, 'tpr_at_0_1pct_fpr')} |"
        )
    return "\n".join(lines)


def shift_verdict(rows: list[dict], max_auc: float) -> tuple[bool, str]:
    """(passed, message): fails when the blind baseline's whole AUC CI lies above `max_auc`."""
    blind = next((r for r in rows if r["attack"] == BLIND), None)
    if blind is None:
        return False, "no blind baseline was scored, so distribution shift was not ruled out"
    if blind["auc_ci_low"] <= max_auc:
        return True, f"shift gate passed: blind baseline AUC {ci_text(blind, 'auc')} does not lie above {max_auc}"
    return False, (
        f"shift gate FAILED: blind baseline AUC {ci_text(blind, 'auc')} lies above {max_auc}. The member and "
        "non-member sets differ in distribution, so attack AUCs measure that shift rather than membership; "
        "draw members and non-members from the same distribution before trusting this audit."
    )


def compare_to_csa(rows: list[dict]) -> list[str]:
    """Which attacks beat CSA at 1% FPR, judged by non-overlapping bootstrap CIs."""
    base = next((r for r in rows if r["attack"] == CSA), None)
    if base is None:
        return []
    lines = []
    for r in rows:
        if r["attack"] in (CSA, BLIND):
            continue
        if r["tpr_at_1pct_fpr_ci_low"] > base["tpr_at_1pct_fpr_ci_high"]:
            verdict = "beats CSA at 1% FPR (CIs do not overlap)"
        elif r["tpr_at_1pct_fpr_ci_high"] < base["tpr_at_1pct_fpr_ci_low"]:
            verdict = "is worse than CSA at 1% FPR (CIs do not overlap)"
        else:
            verdict = "cannot be told apart from CSA at 1% FPR (CIs overlap)"
        lines.append(f"- {r['attack']}: TPR@1%FPR {ci_text(r, 'tpr_at_1pct_fpr')} {verdict}")
    return lines


def verdict_lines(rows: list[dict], max_auc: float) -> list[str]:
    """Plain statements under the table: comparison with CSA, the shift gate, attacks at chance."""
    at_chance = [r["attack"] for r in rows if r["auc_ci_low"] <= 0.5 <= r["auc_ci_high"]]
    return [
        *compare_to_csa(rows),
        f"- {shift_verdict(rows, max_auc)[1]}",
        f"- AUC CI contains 0.5 (no detectable leakage): {', '.join(at_chance) or 'none'}",
    ]


def audit_report(title: str, rows: list[dict], max_auc: float) -> str:
    """The whole comparison report as markdown."""
    return "\n".join([f"# {title}", "", metrics_markdown(rows), "", *verdict_lines(rows, max_auc)])


def scenarios_markdown(rows: list[dict]) -> str:
    """The M^4I scenario table as markdown (rows are `m4i_scenarios` rows)."""
    lines = ["| attack | scenario | shadow (dataset, arch) | AUC [95% CI] | TPR@1%FPR [CI] | attack success rate |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['attack']} | {r['scenario']} | {r['shadow_dataset']}, {r['shadow_arch']} "
            f"| {r['auc']:.3f} [{r['auc_ci_low']:.3f}, {r['auc_ci_high']:.3f}] "
            f"| {r['tpr_at_1pct_fpr']:.3f} [{r['tpr_at_1pct_fpr_ci_low']:.3f}, {r['tpr_at_1pct_fpr_ci_high']:.3f}] "
            f"| {r['attack_success_rate']:.3f} |"
        )
    return "\n".join(lines)
