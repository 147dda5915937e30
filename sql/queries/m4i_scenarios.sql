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
    coalesce(printf('%.3f [%.3f, %.3f]', s.tpr_at_1pct_fpr, s.tpr_at_1pct_fpr_ci_low, s.tpr_at_1pct_fpr_ci_high),
             'NULL') AS tpr_at_1pct_fpr_95ci,
    -- training variance: over `shadow_seeds` shadows of the scenario (NULL spread with one seed)
    coalesce(s.n_seeds, 1) AS n_seeds,
    CASE WHEN s.n_seeds > 1 THEN printf('%.3f +- %.3f', s.auc_seed_mean, s.auc_seed_std)
         ELSE 'unmeasured' END AS auc_over_seeds,
    round(s.attack_success_rate, 3) AS attack_success_rate,
    round(s.shadow_accuracy, 3) AS shadow_accuracy,
    s.mlflow_run_id
FROM m4i_scenarios s
JOIN models m USING (model_version)
ORDER BY m.role DESC, s.model_version, s.attack,
    list_position(['white_box', 'unrestricted', 'data_restricted', 'arch_restricted', 'both_restricted'], s.scenario);
