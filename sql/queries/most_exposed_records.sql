-- The 20 most exposed records of a model version: highest membership score under one attack.
-- Choose with `SET VARIABLE model_version = 'clip-...'; SET VARIABLE attack = 'csa';`
-- (defaults: the latest target model version and the csa attack).
SELECT exposure_rank, record_id, round(score, 4) AS score, is_member, caption
FROM scored_records
WHERE model_version = coalesce(
        getvariable('model_version'),
        (SELECT model_version FROM models WHERE role = 'target' ORDER BY created_at DESC LIMIT 1))
  AND attack = coalesce(getvariable('attack'), 'csa')
ORDER BY exposure_rank, record_id
LIMIT 20;
