-- M^4I threat scenarios (Hu et al. 2022, 4.3) of each audited captioner: both attacks with shadow
-- models that match the target's data and architecture, or not; attack success rate = accuracy at the
-- shadow-chosen threshold (the paper's figure).
SELECT
    s.model_version,
    m.role AS model_role,
    s.attack,
    s.scenario,
    s.shadow_dataset,
    s.shadow_arch,
    s.classifier,
    printf('%.3f [%.3f, %.3f]', s.auc, s.auc_ci_low, s.auc_ci_high) AS auc_95ci,
    printf('%.3f [%.3f, %.3f]', s.tpr_at_1pct_fpr, s.tpr_at_1pct_fpr_ci_low, s.tpr_at_1pct_fpr_ci_high)
        AS tpr_at_1pct_fpr_95ci,
    round(s.attack_success_rate, 3) AS attack_success_rate,
    round(s.shadow_accuracy, 3) AS shadow_accuracy,
    s.mlflow_run_id
FROM m4i_scenarios s
JOIN models m USING (model_version)
ORDER BY m.role DESC, s.model_version, s.attack,
    list_position(['unrestricted', 'data_restricted', 'arch_restricted', 'both_restricted'], s.scenario);
