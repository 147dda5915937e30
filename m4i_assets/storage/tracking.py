"""The MLflow side of an audit (README, Layout): one finished run per audited model version,
metrics and artifacts added to it later, every writer serialised by a file lock beside the store."""

import json
import re
import time
from pathlib import Path
from typing import Any

from m4i_assets.storage.warehouse import file_lock


def _metrics(metrics: dict[str, float], timestamp_ms: int) -> list:
    """MLflow metrics; a name's characters MLflow refuses (anything but letters, digits and `_-. /`, e.g. the
    `+` and `=` of a release-time defense's version) become `_`."""
    from mlflow.entities import Metric

    return [Metric(re.sub(r"[^\w\-. /]", "_", k), float(v), timestamp_ms, 0) for k, v in metrics.items()]


class Mlflow:
    """MLflow tracking (sqlite store beside the warehouse). Writers are serialised by a file lock,
    and the experiment is created once under it: SQLite MLflow races on schema init otherwise."""

    tracking_uri: str
    artifact_root: str
    experiment: str

    def __init__(self, tracking_uri: str, artifact_root: str, experiment: str = "m4i-audits") -> None:
        self.tracking_uri, self.artifact_root, self.experiment = tracking_uri, artifact_root, experiment

    def _client_and_experiment(self):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(
                self.experiment, artifact_location=Path(self.artifact_root).resolve().as_uri()
            )
        )
        return client, exp_id

    def log_artifacts(self, run_id: str, artifacts: dict[str, bytes]) -> None:
        """Add files (name -> bytes) to an existing MLflow run."""
        with file_lock(self._lock):
            client, _ = self._client_and_experiment()
            self._upload(client, run_id, artifacts)

    def log_metrics(self, run_id: str, metrics: dict[str, float], artifacts: dict[str, bytes]) -> None:
        """Add metrics and files to an existing MLflow run."""
        with file_lock(self._lock):
            client, _ = self._client_and_experiment()
            now_ms = int(time.time() * 1000)
            client.log_batch(run_id, metrics=_metrics(metrics, now_ms))
            self._upload(client, run_id, artifacts)

    @property
    def _lock(self) -> Path:
        return Path(self.artifact_root).parent / "mlflow.lock"

    @staticmethod
    def _upload(client, run_id: str, artifacts: dict[str, bytes]) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in artifacts.items():
                path = Path(tmp) / name
                path.write_bytes(data)
                client.log_artifact(run_id, str(path))

    def log_run(
        self,
        run_name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: dict[str, bytes],
    ) -> str:
        """Create one finished MLflow run with params, metrics and artifacts; return its id."""
        from mlflow.entities import Param, RunTag

        with file_lock(self._lock):
            client, exp_id = self._client_and_experiment()
            run = client.create_run(exp_id, run_name=run_name, tags=tags)
            run_id = run.info.run_id
            now_ms = int(time.time() * 1000)
            client.log_batch(
                run_id,
                metrics=_metrics(metrics, now_ms),
                params=[Param(k, v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
            self._upload(client, run_id, artifacts)
            client.set_terminated(run_id)
        return run_id
