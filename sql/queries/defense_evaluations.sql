-- Privacy vs utility of every defense (ATTACKS.md section 3): per family, the undefended target
-- (defense 'none', the reference point) and each defended version, with the strongest attack at 1% FPR,
-- epsilon for DP-SGD (and the conservative bound for CLIP's coupled loss), and the utility it keeps.
SELECT family, defense, strength, round(epsilon, 3) AS epsilon, round(epsilon_conservative, 1) AS epsilon_conservative,
       arg_max(attack, tpr_at_1pct_fpr) AS worst_attack,
       round(max(tpr_at_1pct_fpr), 3) AS worst_tpr_at_1pct_fpr,
       round(max(auc), 3) AS max_auc,
       any_value(utility_metric) AS utility_metric,
       round(any_value(utility), 4) AS utility,
       round(any_value(utility_relative), 3) AS utility_relative,
       model_version
FROM defense_evaluations
GROUP BY family, defense, strength, epsilon, epsilon_conservative, model_version
ORDER BY family, defense <> 'none', defense, strength;
