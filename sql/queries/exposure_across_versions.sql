-- How each record's exposure changed across model versions of one family: its rank under one attack
-- in the oldest and the newest version that have scores for it, largest change first.
-- Choose with `SET VARIABLE attack = 'm4i_mb';` (default csa) and `SET VARIABLE model_role = 'target';`
-- (default: every role). The two versions are chosen first, as constants, so that only their scores are
-- ranked.
SET VARIABLE m4i_chosen_attack = coalesce(getvariable('attack'), 'csa');
SET VARIABLE m4i_chosen_versions = (
    SELECT [arg_min(model_version, (created_at, model_version)), arg_max(model_version, (created_at, model_version))]
    FROM models
    WHERE role = coalesce(getvariable('model_role'), role)
      AND model_version IN (SELECT DISTINCT model_version FROM membership_scores
                            WHERE attack = getvariable('m4i_chosen_attack')));
WITH oldest AS (
    SELECT record_id, model_version, exposure_rank, is_member FROM scored_records
    WHERE model_version = getvariable('m4i_chosen_versions')[1] AND attack = getvariable('m4i_chosen_attack')
), newest AS (
    SELECT record_id, model_version, exposure_rank FROM scored_records
    WHERE model_version = getvariable('m4i_chosen_versions')[2] AND attack = getvariable('m4i_chosen_attack')
)
SELECT o.record_id,
       o.is_member,
       o.model_version AS oldest_version,
       o.exposure_rank AS oldest_rank,
       n.model_version AS newest_version,
       n.exposure_rank AS newest_rank,
       o.exposure_rank - n.exposure_rank AS rank_gain   -- > 0: more exposed in the newest version
FROM oldest o
JOIN newest n USING (record_id)
WHERE o.model_version <> n.model_version
ORDER BY abs(rank_gain) DESC, o.record_id
LIMIT 50;
