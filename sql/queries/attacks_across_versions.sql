-- Every attack compared across model versions, oldest version first: AUC with its CI, TPR at 1% FPR,
-- and whether the AUC CI contains chance. Filter with `SET VARIABLE model_role = 'target';` (default all).
SELECT model_version,
       model_role,
       arch,
       model_created_at,
       attack,
       printf('%.3f [%.3f, %.3f]', auc, auc_ci_low, auc_ci_high) AS auc_95ci,
       round(tpr_at_1pct_fpr, 3) AS tpr_at_1pct_fpr,
       auc_ci_contains_chance,
       auc - lag(auc) OVER (PARTITION BY attack, model_role ORDER BY model_created_at) AS auc_change
FROM audit_summary
WHERE model_role = coalesce(getvariable('model_role'), model_role)
ORDER BY attack, model_role, model_created_at;
