-- The 20 most exposed records of a model version: highest membership score under one attack.
-- Choose with `SET VARIABLE model_version = 'clip-...'; SET VARIABLE attack = 'csa';`
-- (defaults: the latest target model version, and csa for a CLIP or m4i_mb for a captioner).
WITH chosen AS (
    SELECT model_version,
           coalesce(getvariable('attack'), CASE family WHEN 'captioner' THEN 'm4i_mb' ELSE 'csa' END) AS attack
    FROM models
    WHERE model_version = coalesce(
        getvariable('model_version'),
        (SELECT model_version FROM models WHERE role = 'target' ORDER BY created_at DESC LIMIT 1))
)
SELECT s.exposure_rank, s.record_id, round(s.score, 4) AS score, s.is_member, s.caption
FROM scored_records s
JOIN chosen c USING (model_version, attack)
ORDER BY s.exposure_rank, s.record_id
LIMIT 20;
