-- Metrics by attack and model version: AUC, balanced accuracy and TPR at low FPR with 95% CIs.
SELECT
    model_version,
    model_role,
    attack,
    n_members,
    n_nonmembers,
    printf('%.3f [%.3f, %.3f]', auc, auc_ci_low, auc_ci_high) AS auc_95ci,
    round(balanced_accuracy, 3) AS balanced_accuracy,
    printf('%.3f [%.3f, %.3f]', tpr_at_1pct_fpr, tpr_at_1pct_fpr_ci_low, tpr_at_1pct_fpr_ci_high) AS tpr_at_1pct_fpr_95ci,
    printf('%.3f [%.3f, %.3f]', tpr_at_0_1pct_fpr, tpr_at_0_1pct_fpr_ci_low, tpr_at_0_1pct_fpr_ci_high)
        AS tpr_at_0_1pct_fpr_95ci,
    auc_ci_contains_chance,
    mlflow_run_id
FROM audit_summary
ORDER BY model_role DESC, model_version, attack;
