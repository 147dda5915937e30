-- Input rows that could not be used, by source and reason, with one example locator each; compare
-- with `ingestion_summary` (rows in = records + rejects).
SELECT source,
       reason,
       count(*) AS n_rejects,
       min(locator) AS example_locator,
       any_value(detail) AS example_detail
FROM rejects
GROUP BY source, reason
ORDER BY source, n_rejects DESC, reason;
