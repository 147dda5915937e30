-- The `audit_plan` rows of audit $1 of every version but those of $2 ('' for the audit-wide rows).
SELECT attack, status, reason, coalesce(model_version, '') AS model_version, kind
FROM audit_plan
WHERE audit = $1 AND NOT list_contains($2::VARCHAR[], coalesce(model_version, ''))
