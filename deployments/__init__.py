"""Deployment configuration (prefect.yaml) and the serve entry point."""
