"""The audit's facts as the assets read them (README, Storage contract): a version's `models` row, its
audit's records by role, reference captions, the models of a role. One `Repository` per asset (`Home.repository`)
reads each fact once and hands it on; the queries longer than a line are in `sql/repository/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from m4i_assets.data.shards import Shard
from m4i_assets.storage.warehouse import Warehouse, sql_file

CANDIDATE_ROLES = ("member", "nonmember", "candidate")  # what every attack scores (candidates: unlabelled audits)
SHADOW_ROLES = ("shadow", "defended_shadow")
"""The roles of shadow captioners (`Family.defended_helper_role`: the adaptive attacker's ones): models with
`shadow_records`, queried on their own known members and non-members."""


class Repository:
    """Named reads of the warehouse; `model_info` and `audit_records` are read once per repository."""

    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse
        self._models: dict[str, dict[str, Any]] = {}
        self._records: dict[tuple, pl.DataFrame] = {}

    def read(self, sql: str, params: list | None = None) -> pl.DataFrame:
        return self.warehouse.read(sql, params)

    def query(self, name: str, params: list) -> pl.DataFrame:
        """One of the named queries of `sql/repository/`."""
        return self.read(sql_file(str(Path("repository") / f"{name}.sql")), params)

    def signal(self, signal: str, model_version: str, shard: Shard | None = None) -> pl.DataFrame:
        """One model version's signal (every shard of it, in record order; or one `shard`); a clear error when
        it, or a shard of it, was not materialized."""
        files = self.warehouse.signal_files(signal, model_version)
        counts = sorted({s.count for _, s in files})
        where = self.warehouse.signals[signal]
        if not files:
            raise FileNotFoundError(f"no {signal} for {model_version}: materialize `{signal}` for it first ({where})")
        if len(counts) > 1:
            raise FileNotFoundError(f"{signal} of {model_version} is being re-sharded ({counts} shards): "
                                    f"materialize every shard of it again ({where})")  # fmt: skip
        have = {s.index: path for path, s in files}
        wanted = range(counts[0]) if shard is None else [shard.index]
        if shard is not None and shard.count != counts[0]:
            raise FileNotFoundError(f"{signal} of {model_version}: shard {shard.index} of {shard.count} not "
                                    f"materialized (it is in {counts[0]} shards; {where})")  # fmt: skip
        if missing := [i for i in wanted if i not in have]:
            raise FileNotFoundError(f"{signal} of {model_version}: shards {missing} of {counts[0]} not "
                                    f"materialized ({where})")  # fmt: skip
        return pl.concat([pl.read_parquet(have[i]) for i in wanted], how="vertical_relaxed")

    def model_info(self, model_version: str) -> dict[str, Any]:
        """The `models` row of a version; a clear error when it was never registered."""
        if model_version not in self._models:
            rows = self.read("SELECT * FROM models WHERE model_version = ?", [model_version]).to_dicts()
            if not rows:
                raise LookupError(f"model version {model_version!r} is not registered in {self.warehouse.database}")
            self._models[model_version] = rows[0]
        return self._models[model_version]

    def audit_records(self, audit: str, roles: tuple[str, ...], dataset: str | None = None) -> pl.DataFrame:
        """Records of the given roles of an audit (of one dataset, if given) with their role and ground truth,
        by record_id (`sql/repository/audit_records.sql`)."""
        key = (audit, tuple(roles), dataset)
        if key not in self._records:
            self._records[key] = self.query("audit_records", [audit, list(roles), dataset])
        return self._records[key]

    def candidates(self, model_version: str) -> pl.DataFrame:
        """The candidates of a version's audit: the records every attack scores."""
        return self.audit_records(self.model_info(model_version)["audit"], CANDIDATE_ROLES)

    def known_nonmembers(self, model_version: str) -> pl.DataFrame:
        """The known non-members of a version's audit."""
        return self.audit_records(self.model_info(model_version)["audit"], ("known_nonmember",))

    def references(self, record_ids: list[str]) -> list[list[str]]:
        """Every reference caption of each record's image (records that share an image file), in order."""
        frame = self.query("references", [record_ids])
        if frame.height != len(record_ids):
            raise LookupError(f"{len(record_ids) - frame.height} of {len(record_ids)} records are not in `records`")
        return frame["refs"].to_list()

    def captioned_records(self, model_version: str) -> pl.DataFrame:
        """The records a captioner is queried on, with ground truth: a shadow model's known members and
        non-members (`shadow_records`), else the audit's candidates."""
        info = self.model_info(model_version)
        if info["role"] not in SHADOW_ROLES:
            return self.candidates(model_version)
        return self.query("shadow_records", [info["audit"], model_version])

    def latest_versions(self, audit: str, role: str, n: int = 1, family: str = "clip") -> list[str]:
        """The `n` most recently registered model versions of one role and family in an audit, newest first."""
        return self.query("latest_versions", [audit, role, family, n])["model_version"].to_list()

    def shadow_models(self, audit: str, versions: list[str] | None = None) -> list[dict[str, Any]]:
        """The newest shadow captioner of each (training dataset, architecture, training seed) in an audit,
        with its seed as `train_seed`; with `versions`, of those versions (e.g. the shadows an adaptive
        attacker trained with a defense, role `defended_shadow`) instead of the undefended shadows."""
        return self.query("shadow_models", [audit, versions]).to_dicts()

    def versions_of_role(self, audit: str, role: str) -> list[str]:
        """Every model version of one role in an audit, sorted."""
        return self.read("SELECT model_version FROM models WHERE audit = ? AND role = ? ORDER BY model_version",
                         [audit, role])["model_version"].to_list()  # fmt: skip

    def reference_versions(self, audit: str, n: int) -> list[str]:
        """The `n` latest reference models of an audit, sorted; an error if there are fewer."""
        versions = self.latest_versions(audit, "reference", n)
        if len(versions) < n:
            raise LookupError(
                f"audit {audit!r} has {len(versions)} reference models, {n} needed: materialize reference_clips"
            )
        return sorted(versions)

    def reusable_models(self, audit: str, role: str, fingerprint: str) -> list[dict[str, Any]]:
        """Registered models of a role in an audit with this training fingerprint, newest first."""
        return self.read(
            "SELECT * FROM models WHERE train_fingerprint = ? AND role = ? AND audit = ? ORDER BY created_at DESC",
            [fingerprint, role, audit],
        ).to_dicts()

    def record_ids(self, dataset: str) -> list[str]:
        """The record ids of one dataset."""
        return self.read("SELECT record_id FROM records WHERE dataset = ?", [dataset])["record_id"].to_list()

    def dataset_records(self, dataset: str) -> pl.DataFrame:
        """The records of one dataset with what an audit of the registry reads its roles from."""
        return self.read("SELECT record_id, dataset, image_uri, split, metadata FROM records WHERE dataset = ?",
                         [dataset])  # fmt: skip

    def of_version(self, table: str, model_version: str, order: str = "ALL") -> pl.DataFrame:
        """The rows of one of the per-version tables (`VERSION_TABLES`) of a model version, ordered by `order`."""
        if table not in VERSION_TABLES:
            raise ValueError(f"{table!r} is not one of {VERSION_TABLES}")
        return self.read(f"SELECT * FROM {table} WHERE model_version = ? ORDER BY {order}", [model_version])

    def shift_check(self, model_version: str) -> dict[str, Any] | None:
        """The version's known-vs-candidate non-member shift check (`shift_checks`), if the blind baseline ran."""
        rows = self.read("SELECT * FROM shift_checks WHERE model_version = ? AND comparison = "
                         "'known_vs_candidate_nonmembers'", [model_version]).to_dicts()  # fmt: skip
        return rows[0] if rows else None

    def scores_with_truth(self, model_version: str, attack: str | None = None) -> pl.DataFrame:
        """`membership_scores` of a version's candidates with ground truth (of one attack, if given), by attack
        and record id."""
        return self.read(
            "SELECT attack, record_id, score, is_member FROM membership_scores WHERE model_version = ? "
            "AND attack = coalesce(?, attack) AND is_member IS NOT NULL ORDER BY attack, record_id",
            [model_version, attack],
        )

    def known_scores(self, model_version: str) -> pl.DataFrame:
        """Every attack's scores of a version's known non-members (`known_nonmember_scores`)."""
        return self.read("SELECT attack, score FROM known_nonmember_scores WHERE model_version = ? ORDER BY ALL",
                         [model_version])  # fmt: skip

    def mlflow_run(self, model_version: str) -> str | None:
        """The MLflow run `attack_metrics` opened for a version (None before it ran)."""
        return self.read("SELECT any_value(mlflow_run_id) AS r FROM attack_metrics WHERE model_version = ?",
                         [model_version])["r"][0]  # fmt: skip

    def of_versions(self, table: str, versions: list[str]) -> pl.DataFrame:
        """Every row of a per-version table (`VERSION_TABLES`, `model_utility`) of some model versions."""
        if table not in (*VERSION_TABLES, "model_utility"):
            raise ValueError(f"{table!r} is not one of {VERSION_TABLES} or model_utility")
        return self.read(f"SELECT * FROM {table} WHERE list_contains(?, model_version)", [versions])

    def report(self, name: str) -> pl.DataFrame:
        """One of the reporting queries of `sql/queries/` (an empty warehouse answers, empty)."""
        return self.read(sql_file(str(Path("queries") / f"{name}.sql")))

    def newest_target(self) -> str | None:
        """The most recently registered target of any audit and family (None before the first)."""
        rows = self.read("SELECT model_version FROM models WHERE role = 'target' ORDER BY created_at DESC LIMIT 1")
        return rows["model_version"][0] if rows.height else None

    def defended_versions(self, target: str) -> list[str]:
        """The defended versions of a target, by defense and strength."""
        return self.read("SELECT model_version FROM models WHERE role = 'defended' AND base_version = ? "
                         "ORDER BY defense, defense_strength", [target])["model_version"].to_list()  # fmt: skip

    def defense_models(self, target: str) -> pl.DataFrame:
        """A target's and its defended versions' defenses (`sql/repository/defense_models.sql`)."""
        return self.query("defense_models", [target])

    def labelled_scores(self, versions: list[str], excluded: list[str]) -> pl.DataFrame:
        """The scores with ground truth of some versions, of every attack but `excluded`, by version, attack and
        record (`sql/repository/labelled_scores.sql`)."""
        return self.query("labelled_scores", [versions, excluded])

    def plan(self, audit: str) -> pl.DataFrame:
        """An audit's `audit_plan` rows (attack, status, reason), by attack."""
        return self.read("SELECT attack, status, reason FROM audit_plan WHERE audit = ? ORDER BY attack", [audit])

    def plan_kind(self, audit: str) -> str | None:
        """The kind of audit (`labelled`, `unlabelled`) its `audit_plan` says, None before it has one."""
        kinds = self.read("SELECT DISTINCT kind FROM audit_plan WHERE audit = ?", [audit])["kind"]
        return kinds[0] if len(kinds) else None

    def plan_rows_except(self, audit: str, versions: list[str]) -> pl.DataFrame:
        """An audit's `audit_plan` rows of every version but `versions` ('' for the audit-wide rows)."""
        return self.query("plan_rows_except", [audit, versions])

    def skipped_attacks(self, versions: list[str]) -> pl.DataFrame:
        """The (model_version, attack, reason) `audit_plan` skips of some versions, sorted."""
        return self.read("SELECT model_version, attack, reason FROM audit_plan WHERE status = 'skipped' AND "
                         "list_contains(?, model_version) ORDER BY ALL", [versions])  # fmt: skip

    def defense_evaluations(self, audit: str) -> pl.DataFrame:
        """An audit's `defense_evaluations` rows."""
        return self.read("SELECT * FROM defense_evaluations WHERE audit = ?", [audit])

    def record_metadata(self, record_ids: list[str]) -> pl.DataFrame:
        """The metadata of some records (one row per record id), by record id."""
        return self.read("SELECT DISTINCT ON (record_id) record_id, metadata FROM records WHERE "
                         "list_contains(?, record_id)", [record_ids]).sort("record_id")  # fmt: skip

    def record_count(self, datasets: list[str]) -> int:
        """How many records some datasets hold."""
        return self.read("SELECT count(*) AS n FROM records WHERE list_contains(?, dataset)", [datasets])["n"][0]

    def reject_reasons(self, sources: list[str]) -> dict[str, int]:
        """The rejects of some sources per reason, by reason."""
        return dict(self.read("SELECT reason, count(*) AS n FROM rejects WHERE list_contains(?, source) "
                              "GROUP BY reason ORDER BY reason", [sources]).rows())  # fmt: skip

    def records_schema(self) -> pl.DataFrame:
        """`records` with no rows: its columns and their types."""
        return self.read("SELECT * FROM records LIMIT 0")

    def membership_rates(self, versions: list[str]) -> pl.DataFrame:
        """The estimated membership rates of some versions with their role (`sql/repository/membership_rates.sql`)."""
        return self.query("membership_rates", [versions])


VERSION_TABLES = ("attack_metrics", "attack_comparisons", "m4i_scenarios", "pseudo_labels", "shift_checks")
