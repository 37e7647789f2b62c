"""A tpe sweep end to end as issue 28 deploys it: a real PostgreSQL holding Prefect's database and
the Optuna study, a Prefect server on it guarded by an auth string, two process workers, and
the sweep itself started as the ddpm-sweep deployment."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.postgres import missing, postgres_server
from benchmarks.prefect_stack import clean_env, prefect, prefect_server, workers

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(missing() is not None, reason=str(missing())),
]


def wait_final(env: dict[str, str], flow_run_id: str, timeout: float) -> object:
    """The flow run, once it is in a final state."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"],
                            PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}),
        get_client(sync_client=True) as client,
    ):  # fmt: skip
        deadline = time.monotonic() + timeout
        while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
            assert time.monotonic() < deadline, f"{flow_run.name} still {flow_run.state.name}"
            time.sleep(2)
        return flow_run


@pytest.mark.slow(seconds=95)
def test_a_tpe_sweep_on_postgres_through_its_deployment_and_two_workers(
    tmp_path: Path, cifar_writer
) -> None:
    """`prefect deployment run sweep-flow/ddpm-sweep` runs a 4-trial tpe sweep, 2 at once,
    through two workers of a server on PostgreSQL: the sweep Completed, every trial a
    train-flow subflow of it that finished (Completed or pruned), the Optuna study in
    PostgreSQL holding 4 told trials, each created by its trial's process with the values the
    sweep asked for and each epoch reported (the workers read its password from PGPASSWORD,
    not from the URL), and the sweep's table artifact on the server."""
    cifar_writer(tmp_path / "data", images_per_batch=52)
    auth = f"admin:{secrets.token_hex(8)}"
    env = clean_env(tmp_path / "prefect-home")
    with postgres_server(tmp_path / "postgres") as database:
        database.create_database("prefect")
        database.create_database("optuna")
        server_env = {
            **env,
            "PREFECT_SERVER_API_AUTH_STRING": auth,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": database.url("prefect"),
        }
        with prefect_server(server_env, tmp_path / "server.log") as api:
            client = {**env, "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth,
                      "PGPASSWORD": database.password, "PREFECT_WORKER_QUERY_SECONDS": "2",
                      "OMP_NUM_THREADS": "1"}  # fmt: skip
            prefect(client, "work-pool", "create", "ddpm-local", "--type", "process")
            prefect(client, "--no-prompt", "deploy", "--all",
                    "--prefect-file", "deployments/prefect.yaml")  # fmt: skip
            storage = f"postgresql+psycopg://{database.user}@127.0.0.1:{database.port}/optuna"
            spec = {
                "name": "pg", "deployment": "train-flow/ddpm-smoke", "search": "tpe",
                "trials": 4, "concurrency": 2, "startup_trials": 2, "warmup_epochs": 1,
                "storage": storage,
                "base": {"train.epochs": 3, "data.root": str(tmp_path / "data"),
                         "run.dir": str(tmp_path / "runs"), "wandb.mode": "disabled"},
                "vary": {"optim.lr": {"low": 1e-4, "high": 3e-3, "log": True},
                         "model.hidden_size": [8, 16]},
            }  # fmt: skip
            (tmp_path / "pg.yaml").write_text(yaml.safe_dump(spec))
            with workers(client, ["worker-1", "worker-2"], "ddpm-local", tmp_path / "workers"):
                out = prefect(client, "deployment", "run", "sweep-flow/ddpm-sweep",
                              "--param", f"spec={tmp_path / 'pg.yaml'}")  # fmt: skip
                sweep_id = out.split("UUID: ")[1].split()[0]
                sweep = wait_final(client, sweep_id, timeout=400)
            assert sweep.state.is_completed(), (sweep.state, worker_logs(tmp_path))
            check_trials(client, sweep, tmp_path)

        import optuna

        study = optuna.load_study(study_name="pg", storage=database.url("optuna", "psycopg"))
        assert len(study.trials) == 4
        assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
        record = json.loads((tmp_path / "runs" / "sweeps" / "pg" / "sweep.json").read_text())
        for trial in record["trials"]:  # each created by its own process, naming its trial
            optuna_trial = study.trials[trial["number"]]
            assert optuna_trial.user_attrs["sweep_trial"] == trial["index"]
            assert optuna_trial.params == trial["values"]
        for trial in study.trials:
            assert trial.intermediate_values and min(trial.intermediate_values) == 1
        assert study.user_attrs["metric"] == "epoch/loss"


def check_trials(env: dict[str, str], sweep, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    record = json.loads((tmp_path / "runs" / "sweeps" / "pg" / "sweep.json").read_text())
    assert [t["index"] for t in record["trials"]] == [0, 1, 2, 3]
    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"],
                            PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}),
        get_client(sync_client=True) as client,
    ):  # fmt: skip
        for trial in record["trials"]:
            assert trial["state"] in ("Completed", "Pruned"), trial
            assert trial["metric"] is not None and trial["number"] is not None
            flow_run = client.read_flow_run(trial["flow_run_id"])
            assert flow_run.work_pool_name == "ddpm-local"
            parent = client.read_task_run(flow_run.parent_task_run_id)
            assert parent.flow_run_id == sweep.id  # a subflow run of the sweep
        (table,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-pg"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )  # the newest version: every trial's row
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["trial"] for row in rows] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    assert (tmp_path / "runs" / "sweeps" / "pg" / "metric.png").is_file()


def worker_logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in (tmp_path / "workers").glob("*.log"))
