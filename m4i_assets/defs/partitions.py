"""Partitions: one dynamic partition per model version (added when a checkpoint is registered)."""

from dagster import DynamicPartitionsDefinition

model_versions = DynamicPartitionsDefinition(name="model_versions")
