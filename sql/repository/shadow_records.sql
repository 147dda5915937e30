-- The records a shadow captioner is queried on: its known members and non-members. $1 audit, $2 model version.
SELECT s.record_id, r.dataset, r.image_uri, r.caption, s.is_member
FROM shadow_records s
JOIN record_roles x ON x.record_id = s.record_id AND x.audit = $1
JOIN records r ON r.record_id = s.record_id AND r.dataset = x.dataset
WHERE s.model_version = $2
ORDER BY s.record_id
