-- Every reference caption of each record's image (records that share an image file), in the order of $1.
SELECT q.i, list(r.caption ORDER BY r.caption) AS refs
FROM (SELECT unnest($1::VARCHAR[]) AS record_id, generate_subscripts($1::VARCHAR[], 1) AS i) q
JOIN (SELECT DISTINCT ON (record_id) record_id, image_uri FROM records) m USING (record_id)
JOIN (SELECT DISTINCT image_uri, caption FROM records) r USING (image_uri)
GROUP BY q.i
ORDER BY q.i
