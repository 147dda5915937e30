-- Metrics by attack and model version: AUC, balanced accuracy and TPR at low FPR with 95% CIs.
SELECT
    model_version,
    model_role,
    attack,
    n_members,
    n_nonmembers,
    printf('%.3f [%.3f, %.3f]', auc, auc_ci_low, auc_ci_high) AS auc_95ci,
    round(balanced_accuracy, 3) AS balanced_accuracy,
    -- NULL (with a reason in attack_metrics) below ten possible false positives (README, Rules of evidence)
    coalesce(printf('%.3f [%.3f, %.3f]', tpr_at_1pct_fpr, tpr_at_1pct_fpr_ci_low, tpr_at_1pct_fpr_ci_high), 'NULL')
        AS tpr_at_1pct_fpr_95ci,
    coalesce(printf('%.3f [%.3f, %.3f]', tpr_at_0_1pct_fpr, tpr_at_0_1pct_fpr_ci_low, tpr_at_0_1pct_fpr_ci_high),
             'NULL') AS tpr_at_0_1pct_fpr_95ci,
    -- at the threshold fixed on the known non-members' 99th percentile, with Clopper-Pearson CIs
    coalesce(printf('%.3f [%.3f, %.3f]', known_threshold_tpr_1pct, known_threshold_tpr_1pct_ci_low,
                    known_threshold_tpr_1pct_ci_high), 'NULL') AS known_threshold_tpr_1pct_95ci,
    coalesce(printf('%.3f [%.3f, %.3f]', known_threshold_fpr_1pct, known_threshold_fpr_1pct_ci_low,
                    known_threshold_fpr_1pct_ci_high), 'NULL') AS known_threshold_fpr_1pct_95ci,
    auc_ci_contains_chance,
    mlflow_run_id
FROM audit_summary
ORDER BY model_role DESC, model_version, attack;
