-- Views for SQL users (DuckDB CLI, notebooks, BI tools). Re-created by the platform after writes.

-- Every score with its record, its model and its rank among the candidates (1 = most exposed).
CREATE OR REPLACE VIEW scored_records AS
SELECT
    s.model_version,
    m.role AS model_role,
    m.arch,
    s.attack,
    s.record_id,
    r.caption,
    r.image_uri,
    s.score,
    s.is_member,
    rank() OVER (PARTITION BY s.model_version, s.attack ORDER BY s.score DESC) AS exposure_rank,
    percent_rank() OVER (PARTITION BY s.model_version, s.attack ORDER BY s.score) AS score_percentile
FROM membership_scores s
JOIN models m USING (model_version)
LEFT JOIN (SELECT DISTINCT ON (record_id) record_id, caption, image_uri FROM records) r USING (record_id);

-- Attack metrics with the model they describe.
CREATE OR REPLACE VIEW audit_summary AS
SELECT
    a.audit,
    a.model_version,
    m.role AS model_role,
    m.arch,
    a.attack,
    a.n_members,
    a.n_nonmembers,
    a.auc, a.auc_ci_low, a.auc_ci_high,
    a.balanced_accuracy,
    a.tpr_at_1pct_fpr, a.tpr_at_1pct_fpr_ci_low, a.tpr_at_1pct_fpr_ci_high,
    a.tpr_at_0_1pct_fpr, a.tpr_at_0_1pct_fpr_ci_low, a.tpr_at_0_1pct_fpr_ci_high,
    a.tpr_at_1pct_fpr_null_reason, a.tpr_at_0_1pct_fpr_null_reason,
    a.known_threshold_tpr_1pct, a.known_threshold_tpr_1pct_ci_low, a.known_threshold_tpr_1pct_ci_high,
    a.known_threshold_fpr_1pct, a.known_threshold_fpr_1pct_ci_low, a.known_threshold_fpr_1pct_ci_high,
    a.auc_ci_low <= 0.5 AND 0.5 <= a.auc_ci_high AS auc_ci_contains_chance,
    a.mlflow_run_id,
    a.computed_at,
    m.created_at AS model_created_at
FROM attack_metrics a
JOIN models m USING (model_version);

-- Ingestion accounting per dataset: rows in = records + rejects.
CREATE OR REPLACE VIEW ingestion_summary AS
SELECT dataset,
       sum(n_records)::BIGINT AS n_records,
       sum(n_rejects)::BIGINT AS n_rejects,
       (sum(n_records) + sum(n_rejects))::BIGINT AS rows_in
FROM (
    SELECT dataset, count(*) AS n_records, 0 AS n_rejects FROM records GROUP BY dataset
    UNION ALL
    SELECT source AS dataset, 0, count(*) FROM rejects GROUP BY source
)
GROUP BY dataset;
