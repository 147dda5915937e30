-- The warehouse's tables (the storage contract of PLATFORM.md). Created idempotently by the
-- platform before every write; column names are a contract that the views and users rely on.

CREATE TABLE IF NOT EXISTS records (
    record_id      VARCHAR NOT NULL,   -- sha256(image bytes, caption), first 16 hex digits
    dataset        VARCHAR NOT NULL,
    image_uri      VARCHAR NOT NULL,
    caption        VARCHAR NOT NULL,
    width          INTEGER,
    height         INTEGER,
    split          VARCHAR,
    metadata       VARCHAR,            -- JSON text, source-specific
    source_locator VARCHAR,            -- file:row it came from
    ingested_at    TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (dataset, record_id)
);

CREATE TABLE IF NOT EXISTS rejects (
    source      VARCHAR NOT NULL,
    locator     VARCHAR NOT NULL,
    reason      VARCHAR NOT NULL,
    detail      VARCHAR,
    ingested_at TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS record_roles (
    audit     VARCHAR NOT NULL,        -- the controlled audit these roles belong to
    record_id VARCHAR NOT NULL,
    role      VARCHAR NOT NULL,        -- member | nonmember | known_nonmember | population
    is_member BOOLEAN NOT NULL,        -- member of the audit's target training set
    PRIMARY KEY (audit, record_id)
);

CREATE TABLE IF NOT EXISTS models (
    model_version  VARCHAR PRIMARY KEY, -- family + first 12 hex digits of the checkpoint sha256
    family         VARCHAR NOT NULL,    -- clip | captioner
    arch           VARCHAR NOT NULL,
    role           VARCHAR NOT NULL,    -- target | null_control | reference (later: shadow, defended)
    audit          VARCHAR NOT NULL,
    checkpoint_uri VARCHAR NOT NULL,
    sha256         VARCHAR NOT NULL,
    n_params       BIGINT,
    train_config   VARCHAR,             -- JSON text
    train_fingerprint VARCHAR,          -- sha256 of recipe + training record ids (reuse key)
    created_at     TIMESTAMP DEFAULT current_timestamp
);
ALTER TABLE models ADD COLUMN IF NOT EXISTS train_fingerprint VARCHAR;  -- warehouses made before it

CREATE TABLE IF NOT EXISTS membership_scores (
    model_version VARCHAR NOT NULL,
    attack        VARCHAR NOT NULL,
    record_id     VARCHAR NOT NULL,
    score         DOUBLE NOT NULL,      -- higher = more likely member
    is_member     BOOLEAN,              -- NULL when ground truth is unknown
    audit         VARCHAR NOT NULL,
    computed_at   TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model_version, attack, record_id)
);

CREATE TABLE IF NOT EXISTS pseudo_labels (     -- WSA steps 1-2 (Ko et al. 2023)
    model_version     VARCHAR NOT NULL,
    record_id         VARCHAR NOT NULL,     -- a candidate
    cosine_similarity DOUBLE NOT NULL,
    tau               DOUBLE NOT NULL,      -- mean + wsa_lambda * std of the known non-members' CS
    wsa_lambda        DOUBLE NOT NULL,
    rule              VARCHAR NOT NULL,     -- threshold | top_k (fallback when tau kept too few)
    is_pseudo_member  BOOLEAN NOT NULL,     -- cosine_similarity >= tau
    is_member         BOOLEAN,              -- ground truth, for the pseudo-label error rate
    PRIMARY KEY (model_version, record_id)
);

CREATE TABLE IF NOT EXISTS attack_metrics (
    model_version              VARCHAR NOT NULL,
    attack                     VARCHAR NOT NULL,
    audit                      VARCHAR NOT NULL,
    n_members                  INTEGER NOT NULL,
    n_nonmembers               INTEGER NOT NULL,
    auc                        DOUBLE,
    auc_ci_low                 DOUBLE,
    auc_ci_high                DOUBLE,
    balanced_accuracy          DOUBLE,
    balanced_accuracy_ci_low   DOUBLE,
    balanced_accuracy_ci_high  DOUBLE,
    tpr_at_1pct_fpr            DOUBLE,
    tpr_at_1pct_fpr_ci_low     DOUBLE,
    tpr_at_1pct_fpr_ci_high    DOUBLE,
    tpr_at_0_1pct_fpr          DOUBLE,
    tpr_at_0_1pct_fpr_ci_low   DOUBLE,
    tpr_at_0_1pct_fpr_ci_high  DOUBLE,
    n_bootstrap                INTEGER,
    mlflow_run_id              VARCHAR,
    computed_at                TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model_version, attack)
);
