-- The estimated membership rates of the versions $1, each with its model's role, by version.
SELECT m.*, v.role
FROM membership_rate m
JOIN models v USING (model_version)
WHERE list_contains($1::VARCHAR[], model_version)
ORDER BY model_version
