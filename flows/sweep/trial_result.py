"""A trial's result, read from its flow run: the state it ended in (Pruned for a pruner's
stop), why it did not complete, and the metric curve its epoch-metrics table artifact holds
(flows.tracking publishes it; the train flow after every epoch, the sample flow at its end)."""

from __future__ import annotations

import dataclasses
import json

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect.client.schemas.sorting import ArtifactSort

from flows.sweep.record import Trial
from flows.tracking import LINK_KEY, METRICS_KEY


@task(name="trial-result", cache_policy=NO_CACHE)
def trial_result_task(trial: Trial, metric: str, goal: str) -> Trial:
    """The trial with its flow run's outcome: its state (Pruned for a pruner's stop), why it
    did not complete, the metric (the last epoch's, or the last evaluation's), its best
    epoch, mean images/s and W&B run, read from the flow run's epoch-metrics table artifact."""
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(trial.flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]),
                key=ArtifactFilterKey(any_=[METRICS_KEY, LINK_KEY]),
            ),
            sort=ArtifactSort.CREATED_DESC,
        )
    latest = {}
    for artifact in artifacts:  # newest first
        latest.setdefault(artifact.key, artifact.data)
    rows = latest.get(METRICS_KEY) or []
    rows = json.loads(rows) if isinstance(rows, str) else rows
    column = "loss" if metric == "epoch/loss" else metric.removeprefix("eval/")
    curve = [[row["epoch"], row[column]] for row in rows if row.get(column) is not None]
    state, message = flow_run.state.name, flow_run.state.message or ""
    if state == "Cancelled" and message.startswith("pruned"):
        state = "Pruned"
    best = (min if goal == "minimize" else max)(curve, key=lambda c: c[1]) if curve else None
    speeds = [row["images_per_s"] for row in rows if row.get("images_per_s")]
    return dataclasses.replace(
        trial,
        state=state,
        message="" if state == "Completed" else (message.strip().splitlines() or [""])[0][:300],
        metric=curve[-1][1] if curve else None,
        best_epoch=int(best[0]) if best else None,
        images_per_s=round(sum(speeds) / len(speeds), 1) if speeds else None,
        wandb=latest.get(LINK_KEY),
        curve=curve,
    )
