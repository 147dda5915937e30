-- How each record's exposure changed across model versions of one family: its rank under one attack
-- in the oldest and the newest version, largest change first.
-- Choose with `SET VARIABLE attack = 'm4i_mb';` (default csa) and `SET VARIABLE model_role = 'target';`
-- (default: every role).
WITH ranked AS (
    SELECT s.record_id, s.model_version, s.exposure_rank, s.is_member, m.created_at,
           row_number() OVER (PARTITION BY s.record_id ORDER BY m.created_at, s.model_version) AS oldest_first,
           row_number() OVER (PARTITION BY s.record_id ORDER BY m.created_at DESC, s.model_version DESC)
               AS newest_first,
           count(*) OVER (PARTITION BY s.record_id) AS n_versions
    FROM scored_records s
    JOIN models m USING (model_version)
    WHERE s.attack = coalesce(getvariable('attack'), 'csa')
      AND m.role = coalesce(getvariable('model_role'), m.role)
)
SELECT o.record_id,
       o.is_member,
       o.n_versions,
       o.model_version AS oldest_version,
       o.exposure_rank AS oldest_rank,
       n.model_version AS newest_version,
       n.exposure_rank AS newest_rank,
       o.exposure_rank - n.exposure_rank AS rank_gain   -- > 0: more exposed in the newest version
FROM ranked o
JOIN ranked n ON n.record_id = o.record_id AND n.newest_first = 1
WHERE o.oldest_first = 1 AND o.n_versions > 1
ORDER BY abs(rank_gain) DESC, o.record_id
LIMIT 50;
