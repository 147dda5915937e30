"""Dagster entry point (`workspace.yaml` loads this file): the M4I platform's definitions."""

from m4i_assets.defs.definitions import build_definitions

defs = build_definitions()
