"""Prefect orchestration of the ddpm core: thin tasks and train_flow."""

import os

# Route the core's own log lines (skipped checkpoints, skipped image files) into run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ddpm")
