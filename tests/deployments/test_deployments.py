"""Deployments end to end on a real Prefect server bound to 127.0.0.1: create the pool, deploy
from deployments/prefect.yaml, run ddpm-smoke through the CLI, execute it with a worker."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.prefect_stack import REPO, clean_env, prefect, prefect_server
from ddpm.run_dir import RunDir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Prefect server on 127.0.0.1 with its own home; yields the env that talks to it."""
    env = clean_env(tmp_path / "prefect-home")
    with prefect_server(env, tmp_path / "server.log") as api:
        yield {**env, "PREFECT_API_URL": api}


def run_deployment(env: dict[str, str], overrides: dict[str, Any]) -> str:
    """`prefect deployment run 'train-flow/ddpm-smoke' --params ...`, then one worker pass;
    returns the flow run id."""
    import json

    out = prefect(
        env,
        "deployment",
        "run",
        "train-flow/ddpm-smoke",
        "--params",
        json.dumps({"overrides": overrides}),
    )
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out)[1]
    prefect(env, "worker", "start", "--pool", "ddpm-local", "--run-once", timeout=300)
    return flow_run_id


def read_run(env: dict[str, str], flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        flow_run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    return flow_run, {a.key for a in artifacts}


@pytest.mark.slow(seconds=65)
def test_smoke_deployment_end_to_end(server: dict[str, str], tmp_path: Path, cifar_writer) -> None:
    """Deploy all deployments, run ddpm-smoke with train.epochs=1 through a process worker:
    Completed, one epoch's checkpoint and grid, artifacts on the server; ddpm-sample then draws
    3 images from it and ddpm-export writes its diffusers folder; an invalid override ends
    Failed with a validation message, not Crashed."""
    cifar_writer(tmp_path / "data", images_per_batch=52)  # 260 >= the smoke run's 256
    prefect(server, "work-pool", "create", "ddpm-local", "--type", "process")
    out = prefect(
        server, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"
    )
    assert all(f"ddpm-{name}" in out for name in ("cifar10", "smoke", "sample", "export"))

    paths = {
        "data.root": str(tmp_path / "data"),
        "run.dir": str(tmp_path / "runs"),
        "wandb.mode": "disabled",
    }
    flow_run, artifacts = read_run(server, run_deployment(server, {**paths, "train.epochs": 1}))
    assert flow_run.state.type.value == "COMPLETED", flow_run.state.message
    assert flow_run.parameters["overrides"]["train.epochs"] == 1
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [p.name for p in RunDir(run_dir).epoch_checkpoints()] == ["epoch_001.pt"]
    assert (run_dir / "checkpoints" / "epoch_001.pt.sha256").is_file()
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["epoch_001.png"]
    assert {"training-progress", "epoch-metrics", "run-summary"} <= artifacts
    settings = (run_dir / "settings.json").read_text()
    assert '"hidden_size": 16' in settings and '"subset": 256' in settings  # smoke env

    # The trained run's images through the ddpm-sample deployment and the same worker.
    options = {"run": str(run_dir), "num": 3, "out": str(tmp_path / "images")}
    out = prefect(
        server, "deployment", "run", "sample-flow/ddpm-sample",
        "--param", f"options={json.dumps(options)}",
    )  # fmt: skip
    sample_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out)[1]
    prefect(server, "worker", "start", "--pool", "ddpm-local", "--run-once", timeout=300)
    flow_run, artifacts = read_run(server, sample_run_id)
    assert flow_run.state.type.value == "COMPLETED", flow_run.state.message
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == [
        "000000.png", "000001.png", "000002.png",
    ]  # fmt: skip
    assert {"generation-progress", "generation-summary"} <= artifacts

    # And exported through the ddpm-export deployment: a folder diffusers loads (test_export).
    out = prefect(
        server, "deployment", "run", "export-flow/ddpm-export",
        "--param", f"run={run_dir}", "--param", f"out={tmp_path / 'export'}",
    )  # fmt: skip
    export_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out)[1]
    prefect(server, "worker", "start", "--pool", "ddpm-local", "--run-once", timeout=300)
    flow_run, artifacts = read_run(server, export_run_id)
    assert flow_run.state.type.value == "COMPLETED", flow_run.state.message
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["unet"] == ["assignment_unet", "AssignmentUNet"] and "export" in artifacts

    flow_run, _ = read_run(server, run_deployment(server, {**paths, "optim.lr": -1}))
    assert flow_run.state.type.value == "FAILED"
    assert "optim.lr" in flow_run.state.message and "greater than 0" in flow_run.state.message


def test_serve_builds_the_same_deployments() -> None:
    """deployments/serve.py serves prefect.yaml's deployments, the smoke sizes as overrides,
    ddpm-sample with its parameters left to the run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve", REPO / "deployments" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    deployments = {d.name: d for d in serve.served_deployments()}
    assert set(deployments) == {
        "ddpm-cifar10", "ddpm-smoke", "ddpm-sample", "ddpm-export", "ddpm-ema", "ddpm-prepare",
        "ddpm-sweep",
    }  # fmt: skip
    assert deployments["ddpm-cifar10"].parameters == {"overrides": {}}
    assert deployments["ddpm-sample"].parameters == deployments["ddpm-export"].parameters == {}
    assert deployments["ddpm-sweep"].parameters == {}
    smoke = deployments["ddpm-smoke"].parameters["overrides"]
    assert smoke["model.hidden_size"] == "16" and smoke["train.epochs"] == "2"
    from settings import load_settings

    assert load_settings(smoke, env_file=None).data.subset == 256


def test_serving_one_deployment_puts_its_env_in_the_process(monkeypatch) -> None:
    """`ddpm-serve --deployment train-flow/ddpm-smoke` (what a sweep without a server runs)
    serves that deployment alone with its DDPM_* job variables in the process's environment,
    as a worker sets them, so a run's overrides add to them instead of replacing them; an
    unknown name is refused naming it."""
    from deployments.serve import served_deployments

    for name in ("DDPM_MODEL__HIDDEN_SIZE", "DDPM_TRAIN__EPOCHS", "DDPM_RUN__DIR"):
        monkeypatch.delenv(name, raising=False)  # restored (removed) after the test
    (smoke,) = served_deployments("train-flow/ddpm-smoke")
    assert smoke.name == "ddpm-smoke" and smoke.parameters == {"overrides": {}}
    assert os.environ["DDPM_MODEL__HIDDEN_SIZE"] == "16" and os.environ["DDPM_TRAIN__EPOCHS"] == "2"
    with pytest.raises(SystemExit, match="no deployment named train-flow/nope"):
        served_deployments("train-flow/nope")
