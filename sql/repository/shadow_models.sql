-- The newest shadow captioner of each (training dataset, architecture, training seed) of audit $1, its seed as
-- `train_seed`: the undefended shadows, or with $2 (a list of versions) those versions.
SELECT DISTINCT ON (train_dataset, arch, train_seed) *
FROM (SELECT *, CAST(json_extract(train_config, '$.seed') AS INTEGER) AS train_seed FROM models
      WHERE audit = $1 AND family = 'captioner'
        AND (role = 'shadow' AND $2 IS NULL OR list_contains(coalesce($2, []), model_version)))
ORDER BY train_dataset, arch, train_seed, created_at DESC
