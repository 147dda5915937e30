-- The $4 most recently registered model versions of role $2 and family $3 in audit $1, newest first.
SELECT model_version FROM models
WHERE audit = $1 AND role = $2 AND family = $3
ORDER BY created_at DESC
LIMIT $4
