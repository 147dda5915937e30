"""The report's verdicts: the shift gate, the relative criterion against the blind baseline, paired wording."""

from m4i_assets.metrics import report


def _row(attack, auc, low, high):
    return {"attack": attack, "auc": auc, "auc_ci_low": low, "auc_ci_high": high}


def _cmp(attack, baseline, metric, diff, low, high):
    return {"attack": attack, "baseline": baseline, "metric": metric, "difference": diff, "ci_low": low,
            "ci_high": high}  # fmt: skip


def test_shift_gate_fails_on_a_blind_baseline_or_known_nonmembers_far_from_chance():
    rows = [_row("csa", 0.9, 0.85, 0.95), _row("blind_baseline", 0.52, 0.47, 0.57)]
    assert report.shift_verdict(rows, 0.1)[0]
    assert not report.shift_verdict([rows[0], _row("blind_baseline", 0.7, 0.65, 0.75)], 0.1)[0]
    assert report.shift_verdict([rows[0], _row("blind_baseline", 0.6, 0.58, 0.62)], 0.1)[0]  # within the margin
    passed, text = report.shift_verdict(rows, 0.1, _row("known", 0.8, 0.75, 0.85))
    assert not passed and "known non-members" in text
    assert not report.shift_verdict(rows[:1], 0.1)[0]  # no blind baseline: not ruled out
    passed, text = report.shift_verdict([rows[0], _row("blind_baseline", 0.22, 0.11, 0.31)], 0.1)
    assert passed and "out-of-fold bias" in text  # below chance is small-sample anti-learning, not shift


def test_leakage_is_shown_only_where_the_best_attack_beats_the_blind_baseline_by_a_paired_ci():
    rows = [_row("csa", 0.60, 0.55, 0.65), _row("clip_loss", 0.62, 0.57, 0.67), _row("blind_baseline", 0.5, 0.45, 0.55)]
    above = [_cmp("clip_loss", "blind_baseline", "auc", 0.12, 0.02, 0.2)]
    assert report.beats_blind_verdict(rows, above)[0]
    straddles = [_cmp("clip_loss", "blind_baseline", "auc", 0.12, -0.01, 0.2)]
    passed, text = report.beats_blind_verdict(rows, straddles)
    assert not passed and "no membership leakage is shown" in text


def test_verdicts_read_paired_differences_not_ci_overlap():
    rows = [_row("csa", 0.90, 0.87, 0.93), _row("clip_loss", 0.91, 0.88, 0.94), _row("blind_baseline", 0.5, 0.46, 0.54)]
    comparisons = [_cmp("clip_loss", "csa", "auc", 0.01, -0.01, 0.03), _cmp("clip_loss", "csa", "tpr_at_1pct_fpr",
                   0.13, 0.04, 0.23), _cmp("clip_loss", "blind_baseline", "auc", 0.41, 0.36, 0.46)]  # fmt: skip
    text = "\n".join(report.verdict_lines(rows, comparisons, 0.1))
    assert (
        "clip_loss vs csa: AUC +0.010 [-0.010, +0.030] (not told apart); TPR@1%FPR +0.130 [+0.040, +0.230] "
        "(better)" in text
    )
    assert "beat CSA in TPR@1%FPR (paired CI above 0): clip_loss" in text
    assert "beat CSA in AUC (paired CI above 0): none" in text


def test_a_model_without_csa_gets_no_verdict_against_it():
    rows = [_row("m4i_loss", 0.99, 0.98, 1.0), _row("blind_baseline", 0.5, 0.46, 0.54)]
    comparisons = [_cmp("m4i_loss", "blind_baseline", "auc", 0.49, 0.45, 0.53)]
    text = "\n".join(report.verdict_lines(rows, comparisons, 0.1))
    assert "CSA" not in text and "m4i_loss beats the blind baseline" in text


def test_null_control_verdict_names_the_attacks_off_chance():
    rows = [{"attack": "csa", "auc": 0.5, "auc_ci_low": 0.45, "auc_ci_high": 0.55},
            {"attack": "aea", "auc": 0.6, "auc_ci_low": 0.56, "auc_ci_high": 0.64}]  # fmt: skip
    passed, message, off = report.null_control_verdict("null_control", rows)
    assert not passed and len(off) == 1 and off[0].startswith("aea") and "excludes 0.5" in message
    assert report.null_control_verdict("null_control", rows[:1])[0]
    assert report.null_control_verdict("target", rows) == (True, "applies to null controls only; this is a target", [])


def test_extractor_quality_is_a_table_beside_the_scenarios():
    from m4i_assets.metrics.report import extractors_markdown

    measured = {"n_pairs": 48, "recall@1": 0.0625, "chance@1": 1 / 48, "recall@5": 0.25, "chance@5": 5 / 48}
    text = extractors_markdown({"captioner-a@x": measured, "captioner-b@x": {}})
    assert "| captioner-a@x | 48 | 0.062 (0.021) | 0.250 (0.104) |" in text
    assert "| captioner-b@x | n/a | NULL (NULL) | NULL (NULL) |" in text
