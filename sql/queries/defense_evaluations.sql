-- Privacy vs utility of every defense (README, Defenses): per family, the undefended target
-- (defense 'none', the reference point) and each defended version, naive and adaptive attacker apart, with
-- the strongest attack's privacy read (privacy_tpr: TPR@1%FPR where reported, from 1000 non-members up, else the
-- TPR at the known non-members' 1% threshold, the rules of evidence; privacy_figure says which), epsilon for
-- DP-SGD (the accountant's, epsilon_is_guarantee false for CLIP, and the empirical lower bound), and the
-- utility it keeps beside its chance level.
SELECT family, defense, strength, attacker,
       round(epsilon, 3) AS epsilon, any_value(epsilon_is_guarantee) AS epsilon_is_guarantee,
       round(any_value(epsilon_lb), 3) AS epsilon_lb,
       arg_max(attack, privacy_tpr) AS worst_attack,
       round(max(privacy_tpr), 3) AS worst_tpr,
       round(arg_max(privacy_tpr_ci_low, privacy_tpr), 3) AS ci_low,
       round(arg_max(privacy_tpr_ci_high, privacy_tpr), 3) AS ci_high,
       arg_max(privacy_figure, privacy_tpr) AS tpr_read_as,
       round(max(auc), 3) AS max_auc,
       any_value(utility_metric) AS utility_metric,
       round(any_value(utility), 4) AS utility,
       round(any_value(utility_chance), 4) AS utility_chance,
       round(any_value(utility_relative), 3) AS utility_relative,
       model_version
FROM defense_evaluations
GROUP BY family, defense, strength, attacker, epsilon, model_version
ORDER BY family, defense <> 'none', defense, strength, attacker DESC;
