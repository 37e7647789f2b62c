"""Prefect orchestration of the ddpm core: thin tasks and the flows train_flow and sample_flow."""
