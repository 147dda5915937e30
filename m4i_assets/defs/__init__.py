"""The thin Dagster layer: assets by domain, resources chosen by environment, partitions, checks."""
