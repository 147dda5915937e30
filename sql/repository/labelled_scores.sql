-- The scores with ground truth of the versions $1, of every attack but those of $2, by version, attack, record.
SELECT model_version, attack, record_id, score, is_member FROM membership_scores
WHERE list_contains($1::VARCHAR[], model_version) AND is_member IS NOT NULL
  AND NOT list_contains($2::VARCHAR[], attack)
ORDER BY model_version, attack, record_id
