-- The warehouse's tables (README, Storage contract). Created idempotently by the
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
-- The dataset an audit takes a record from: the same record (content) may be in several datasets.
ALTER TABLE record_roles ADD COLUMN IF NOT EXISTS dataset VARCHAR;
-- An unlabelled audit's candidates (role 'candidate') have unknown membership: is_member NULL.
ALTER TABLE record_roles ALTER COLUMN is_member DROP NOT NULL;

CREATE TABLE IF NOT EXISTS audit_plan (       -- what an audit of the registry runs, and why it skips the rest
    audit   VARCHAR NOT NULL,
    kind    VARCHAR NOT NULL,          -- labelled | unlabelled
    attack  VARCHAR NOT NULL,
    status  VARCHAR NOT NULL,          -- run | skipped
    reason  VARCHAR,                   -- what the audit lacks, for a skipped attack
    -- '' for the whole audit; else the one version whose release interface rules the attack out
    -- (`defenses.release.attack_skip_reason`: WSA against a similarities-only release)
    model_version VARCHAR NOT NULL DEFAULT '',
    PRIMARY KEY (audit, attack, model_version)
);

CREATE TABLE IF NOT EXISTS membership_rate (  -- unlabelled audits: how many candidates look like members
    model_version      VARCHAR NOT NULL,
    attack             VARCHAR NOT NULL,
    audit              VARCHAR NOT NULL,
    n_candidates       INTEGER NOT NULL,
    n_known_nonmembers INTEGER NOT NULL,
    alpha              DOUBLE NOT NULL,   -- the known non-members' false-positive rate at the threshold
    threshold          DOUBLE NOT NULL,   -- the known non-members' (1 - alpha) score quantile
    share_above        DOUBLE NOT NULL,   -- candidates scoring above the threshold
    estimated_rate     DOUBLE NOT NULL,   -- share_above - alpha: a lower estimate of the members' share
    ci_low             DOUBLE NOT NULL,   -- Clopper-Pearson 95% CI of share_above, minus alpha
    ci_high            DOUBLE NOT NULL,
    computed_at        TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model_version, attack)
);

CREATE TABLE IF NOT EXISTS models (
    model_version  VARCHAR PRIMARY KEY, -- family + first 12 hex digits of the checkpoint sha256
    family         VARCHAR NOT NULL,    -- clip | captioner
    arch           VARCHAR NOT NULL,
    role           VARCHAR NOT NULL,    -- target | null_control | reference | shadow | defended | defended_reference | defended_shadow
    audit          VARCHAR NOT NULL,
    checkpoint_uri VARCHAR NOT NULL,
    sha256         VARCHAR NOT NULL,
    n_params       BIGINT,
    train_config   VARCHAR,             -- JSON text
    train_fingerprint VARCHAR,          -- sha256 of recipe + training record ids (reuse key)
    created_at     TIMESTAMP DEFAULT current_timestamp
);
ALTER TABLE models ADD COLUMN IF NOT EXISTS train_fingerprint VARCHAR;  -- warehouses made before it
ALTER TABLE models ADD COLUMN IF NOT EXISTS train_dataset VARCHAR;  -- dataset(s) of the training records
-- Defended versions (role 'defended'): the defense, its strength, the undefended target it defends, and
-- what the defense reports (JSON: epsilon at delta for DP-SGD, the best epoch for early stopping, ...).
ALTER TABLE models ADD COLUMN IF NOT EXISTS defense VARCHAR;
ALTER TABLE models ADD COLUMN IF NOT EXISTS defense_strength DOUBLE;
ALTER TABLE models ADD COLUMN IF NOT EXISTS base_version VARCHAR;
ALTER TABLE models ADD COLUMN IF NOT EXISTS defense_facts VARCHAR;

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
    tau               DOUBLE NOT NULL,      -- from the known non-members' CS (rule quantile or gaussian)
    wsa_lambda        DOUBLE NOT NULL,
    rule              VARCHAR NOT NULL,     -- quantile | gaussian | top_k (fallback when tau kept too few)
    is_pseudo_member  BOOLEAN NOT NULL,     -- cosine_similarity >= tau
    is_member         BOOLEAN,              -- ground truth, for the pseudo-label error rate
    PRIMARY KEY (model_version, record_id)
);
ALTER TABLE pseudo_labels ADD COLUMN IF NOT EXISTS wsa_alpha DOUBLE;   -- tau rule "quantile": (1 - alpha) quantile
ALTER TABLE pseudo_labels ADD COLUMN IF NOT EXISTS fold INTEGER;       -- cross-fitting fold of the candidate

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
-- Honest low-FPR figures (README, Rules of evidence): a TPR at x FPR is NULL unless n_nonmembers * x >= 10, with
-- the reason; the raw figure stays beside it for the privacy-utility curves. Beside them, the threshold at the
-- known non-members' (1 - x) quantile and, at it, the candidates' TPR and realised FPR with Clopper-Pearson CIs.
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS tpr_at_1pct_fpr_null_reason VARCHAR;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS tpr_at_0_1pct_fpr_null_reason VARCHAR;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS tpr_at_1pct_fpr_raw DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS tpr_at_0_1pct_fpr_raw DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_note VARCHAR;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_1pct DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_tpr_1pct DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_tpr_1pct_ci_low DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_tpr_1pct_ci_high DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_fpr_1pct DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_fpr_1pct_ci_low DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_fpr_1pct_ci_high DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_0_1pct DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_tpr_0_1pct DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_tpr_0_1pct_ci_low DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_tpr_0_1pct_ci_high DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_fpr_0_1pct DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_fpr_0_1pct_ci_low DOUBLE;
ALTER TABLE attack_metrics ADD COLUMN IF NOT EXISTS known_threshold_fpr_0_1pct_ci_high DOUBLE;

CREATE TABLE IF NOT EXISTS attack_comparisons (  -- paired bootstrap differences (README, Rules of evidence)
    model_version VARCHAR NOT NULL,
    audit         VARCHAR NOT NULL,
    attack        VARCHAR NOT NULL,
    baseline      VARCHAR NOT NULL,     -- csa | blind_baseline
    metric        VARCHAR NOT NULL,     -- an attack_metrics column: auc, tpr_at_1pct_fpr, tpr_at_0_1pct_fpr
    difference    DOUBLE NOT NULL,      -- attack's metric - baseline's, on the same records
    ci_low        DOUBLE NOT NULL,      -- percentile CI of the difference over one set of paired resamples
    ci_high       DOUBLE NOT NULL,
    computed_at   TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model_version, attack, baseline, metric)
);

CREATE TABLE IF NOT EXISTS known_nonmember_scores (  -- each attack's scores of the known non-members, where it
    model_version VARCHAR NOT NULL,                  -- can give them without having been fit on them: they fix
    attack        VARCHAR NOT NULL,                  -- the known-threshold figures of attack_metrics
    record_id     VARCHAR NOT NULL,
    score         DOUBLE NOT NULL,
    audit         VARCHAR NOT NULL,
    PRIMARY KEY (model_version, attack, record_id)
);
CREATE TABLE IF NOT EXISTS shift_checks (  -- distribution-shift tests beside the blind baseline (Das et al. 2024)
    model_version VARCHAR NOT NULL,
    audit         VARCHAR NOT NULL,
    comparison    VARCHAR NOT NULL,     -- known_vs_candidate_nonmembers: a blind classifier of known vs candidate
    auc           DOUBLE,               -- non-members (WSA and the known-threshold figures assume they are alike)
    auc_ci_low    DOUBLE,
    auc_ci_high   DOUBLE,
    n_a           INTEGER,
    n_b           INTEGER,
    computed_at   TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model_version, comparison)
);
CREATE TABLE IF NOT EXISTS shadow_records (    -- M^4I shadow models' attacker data (Hu et al. 2022)
    model_version VARCHAR NOT NULL,        -- a shadow model
    record_id     VARCHAR NOT NULL,        -- population records only: never a candidate
    is_member     BOOLEAN NOT NULL,        -- in the shadow's training set (known to the attacker)
    PRIMARY KEY (model_version, record_id)
);

CREATE TABLE IF NOT EXISTS m4i_scenarios (     -- M^4I attacks per threat scenario (Hu et al. 2022, 4.3)
    model_version        VARCHAR NOT NULL,  -- the audited captioner
    attack               VARCHAR NOT NULL,  -- m4i_mb | m4i_fb
    scenario             VARCHAR NOT NULL,  -- unrestricted | data_restricted | arch_restricted | both_restricted
    audit                VARCHAR NOT NULL,
    target_dataset       VARCHAR NOT NULL,
    target_arch          VARCHAR NOT NULL,
    shadow_version       VARCHAR NOT NULL,
    shadow_dataset       VARCHAR NOT NULL,
    shadow_arch          VARCHAR NOT NULL,
    classifier           VARCHAR NOT NULL,  -- the shadow-trained classifier kind (svm | logreg | mlp)
    n_members            INTEGER NOT NULL,
    n_nonmembers         INTEGER NOT NULL,
    auc                  DOUBLE,
    auc_ci_low           DOUBLE,
    auc_ci_high          DOUBLE,
    tpr_at_1pct_fpr      DOUBLE,
    tpr_at_1pct_fpr_ci_low  DOUBLE,
    tpr_at_1pct_fpr_ci_high DOUBLE,
    attack_success_rate  DOUBLE,            -- accuracy at the shadow-chosen threshold (the paper's figure)
    shadow_accuracy      DOUBLE,            -- the classifier's accuracy on held-out shadow data (20%)
    mlflow_run_id        VARCHAR,
    computed_at          TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model_version, attack, shadow_version)  -- several shadows may share a scenario
);
-- Training variance (`shadow_seeds` > 1): the scenario's AUC and TPR@1%FPR over the shadows of every seed.
ALTER TABLE m4i_scenarios ADD COLUMN IF NOT EXISTS n_seeds INTEGER;
ALTER TABLE m4i_scenarios ADD COLUMN IF NOT EXISTS auc_seed_mean DOUBLE;
ALTER TABLE m4i_scenarios ADD COLUMN IF NOT EXISTS auc_seed_std DOUBLE;
ALTER TABLE m4i_scenarios ADD COLUMN IF NOT EXISTS tpr_at_1pct_fpr_seed_mean DOUBLE;
ALTER TABLE m4i_scenarios ADD COLUMN IF NOT EXISTS tpr_at_1pct_fpr_seed_std DOUBLE;

CREATE TABLE IF NOT EXISTS model_utility (      -- what a model version is good for, on held-out records
    model_version VARCHAR NOT NULL,
    metric        VARCHAR NOT NULL,        -- i2t_recall@k, t2i_recall@k, zero_shot_accuracy; bleu4, rougeL, cider
    value         DOUBLE NOT NULL,
    chance        DOUBLE,                  -- the same metric by chance: recall@k k/n, zero-shot 1/classes,
                                           -- captions: another held-out image's reference caption
    n_records     INTEGER NOT NULL,        -- the held-out records (the audit's non-members)
    audit         VARCHAR NOT NULL,
    computed_at   TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model_version, metric)
);

CREATE TABLE IF NOT EXISTS defense_evaluations (  -- privacy vs utility of each defended version (README, Defenses)
    audit                    VARCHAR NOT NULL,
    family                   VARCHAR NOT NULL,    -- clip | captioner
    defense                  VARCHAR NOT NULL,    -- 'none' for the undefended target, the curves' reference
    strength                 DOUBLE,
    epsilon                  DOUBLE,              -- DP-SGD: Opacus's accountant at the stated delta
    epsilon_conservative     DOUBLE,              -- CLIP DP-SGD: a valid bound for the coupled InfoNCE loss
    attack                   VARCHAR NOT NULL,
    auc                      DOUBLE,
    auc_ci_low               DOUBLE,
    auc_ci_high              DOUBLE,
    tpr_at_1pct_fpr          DOUBLE,
    tpr_at_1pct_fpr_ci_low   DOUBLE,
    tpr_at_1pct_fpr_ci_high  DOUBLE,
    utility_metric           VARCHAR NOT NULL,
    utility                  DOUBLE,
    utility_relative         DOUBLE,              -- utility / the undefended target's
    utility_chance           DOUBLE,              -- the utility metric by chance (model_utility.chance)
    utility_relative_regularised DOUBLE,          -- utility / the best-utility augmentation-defended version's
    attacker                 VARCHAR NOT NULL DEFAULT 'naive', -- naive | adaptive (knows the defense)
    epsilon_is_guarantee     BOOLEAN,             -- whether `epsilon` is a DP guarantee (not for CLIP's InfoNCE)
    epsilon_lb               DOUBLE,              -- empirical lower bound from the strongest attack (Clopper-Pearson)
    epsilon_lb_attack        VARCHAR,             -- the attack that gives it, picked on a held-out half
    model_version            VARCHAR NOT NULL,
    mlflow_run_id            VARCHAR,             -- the version's audit run
    computed_at              TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model_version, attack)
);
-- the rules of evidence: tpr_at_1pct_fpr is NULL below 1000 non-members (the reason beside it); the curves read
-- the TPR at the known non-members' 1% threshold and the realised FPR on the candidates, Clopper-Pearson CIs.
ALTER TABLE defense_evaluations ADD COLUMN IF NOT EXISTS tpr_at_1pct_fpr_null_reason VARCHAR;
ALTER TABLE defense_evaluations ADD COLUMN IF NOT EXISTS known_threshold_tpr_1pct DOUBLE;
ALTER TABLE defense_evaluations ADD COLUMN IF NOT EXISTS known_threshold_tpr_1pct_ci_low DOUBLE;
ALTER TABLE defense_evaluations ADD COLUMN IF NOT EXISTS known_threshold_tpr_1pct_ci_high DOUBLE;
ALTER TABLE defense_evaluations ADD COLUMN IF NOT EXISTS known_threshold_fpr_1pct DOUBLE;
ALTER TABLE defense_evaluations ADD COLUMN IF NOT EXISTS known_threshold_fpr_1pct_ci_low DOUBLE;
ALTER TABLE defense_evaluations ADD COLUMN IF NOT EXISTS known_threshold_fpr_1pct_ci_high DOUBLE;
-- The curves' privacy read: tpr_at_1pct_fpr (bootstrap CI) where reported, else the known-threshold TPR (CP CI)
ALTER TABLE defense_evaluations ADD COLUMN IF NOT EXISTS privacy_tpr DOUBLE;
ALTER TABLE defense_evaluations ADD COLUMN IF NOT EXISTS privacy_tpr_ci_low DOUBLE;
ALTER TABLE defense_evaluations ADD COLUMN IF NOT EXISTS privacy_tpr_ci_high DOUBLE;
ALTER TABLE defense_evaluations ADD COLUMN IF NOT EXISTS privacy_figure VARCHAR; -- tpr_at_1pct_fpr | known_threshold_tpr_1pct
