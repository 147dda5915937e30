-- Metrics by attack and model version: AUC with its 95% CI and TPR at low FPR.
SELECT
    model_version,
    model_role,
    attack,
    n_members,
    n_nonmembers,
    printf('%.3f [%.3f, %.3f]', auc, auc_ci_low, auc_ci_high) AS auc_95ci,
    round(tpr_at_1pct_fpr, 3) AS tpr_at_1pct_fpr,
    round(tpr_at_0_1pct_fpr, 3) AS tpr_at_0_1pct_fpr,
    auc_ci_contains_chance,
    mlflow_run_id
FROM audit_summary
ORDER BY model_role DESC, model_version, attack;
