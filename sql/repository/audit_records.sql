-- Records of the given roles of an audit (of one dataset, if given) with their role and ground truth. A record
-- is read from the dataset its role names: its identity (content hash) and its membership in a dataset are
-- separate facts, and two datasets may share records. $1 audit, $2 roles (list), $3 dataset or NULL.
SELECT x.record_id, r.dataset, r.image_uri, r.caption, x.role, x.is_member
FROM record_roles x
JOIN records r ON r.record_id = x.record_id AND r.dataset = x.dataset
WHERE x.audit = $1 AND list_contains($2::VARCHAR[], x.role) AND r.dataset = coalesce($3, r.dataset)
ORDER BY x.record_id
