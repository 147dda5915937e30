-- The 20 most exposed records of a model version: highest membership score under one attack.
-- Choose with `SET VARIABLE model_version = 'clip-...'; SET VARIABLE attack = 'csa';`
-- (defaults: the latest target model version, and csa for a CLIP or m4i_mb for a captioner).
-- The choice is set first, as constants, so that `scored_records` ranks that version's scores only
-- (a join against the choice would rank every row of every version first).
SET VARIABLE m4i_chosen_version = coalesce(
    getvariable('model_version'),
    (SELECT model_version FROM models WHERE role = 'target' ORDER BY created_at DESC LIMIT 1));
SET VARIABLE m4i_chosen_attack = coalesce(
    getvariable('attack'),
    (SELECT CASE family WHEN 'captioner' THEN 'm4i_mb' ELSE 'csa' END FROM models
     WHERE model_version = getvariable('m4i_chosen_version')));
SELECT exposure_rank, record_id, round(score, 4) AS score, is_member, caption
FROM scored_records
WHERE model_version = getvariable('m4i_chosen_version') AND attack = getvariable('m4i_chosen_attack')
ORDER BY exposure_rank, record_id
LIMIT 20;
