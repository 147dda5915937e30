"""M4I: membership-inference audits for multi-modal models.

Importing the package turns off the usage telemetry of the libraries it drives (MLflow's, the Hugging Face hub
client's) in this process and in those it starts (the Dagster daemon, each run and step), unless the environment
already sets them: what an audit reads and writes stays on the machine."""

import os

TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_DISABLE_TELEMETRY": "1"}

for _name, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_name, _value)
