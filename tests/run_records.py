"""What a run recorded, read back for tests: W&B history rows and a flow run's Prefect
artifacts."""

from __future__ import annotations

import json
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId


def history(records: list[Any]) -> list[dict[str, Any]]:
    """History rows as {key: value} (nested keys joined with '/')."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
    return rows


def flow_artifacts(flow_run_id: Any) -> dict[str, list[Any]]:
    """The flow run's Prefect artifacts by key, oldest first."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key: dict[str, list[Any]] = {}
    for artifact in sorted(found, key=lambda a: a.created):
        by_key.setdefault(artifact.key, []).append(artifact)
    return by_key
