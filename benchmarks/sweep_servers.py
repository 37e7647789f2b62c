"""A sweep through a real Prefect server and two workers, on SQLite and on PostgreSQL (issue 28).

    python -m benchmarks.sweep_servers [--trials 8] [--concurrency 4] [--repeat 1] [--json PATH]

For each database: a fresh server (`prefect server start`; PostgreSQL 15 started here from the
machine's binaries, as the tests do), the ddpm-local pool, the deployments, two process
workers, then `ddpm-sweep --spec` with a grid of tiny trials on the ddpm-smoke deployment
(hidden 8/16, 2 epochs of 256 generated CIFAR-10-format images, CPU). Reported: the sweep's
wall time, trials finished, and what the logs of the server, the workers, the sweep and the
trials hold of "database is locked", API errors (HTTP 5xx, "Error", tracebacks) and retries.

Then the overhead of a trial through `run_deployment`: the same tiny run (a) as a plain
command, `python flows/train_flow.py` against the same server, and (b) as a flow run of the
ddpm-smoke deployment picked up by a worker (from the call to its final state), on the SQLite
server with the workers' default polling (PREFECT_WORKER_QUERY_SECONDS, 10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml

from benchmarks.faults import write_cifar10
from benchmarks.postgres import postgres_server
from benchmarks.prefect_stack import REPO, clean_env, prefect, prefect_server, workers

PATTERNS = {
    "database is locked": re.compile(r"database is locked", re.I),
    "HTTP 5xx": re.compile(r"HTTP/1\.1\" 5\d\d|\b5\d\d (Internal Server|Service Unavail)"),
    "retries": re.compile(r"retry|retrying", re.I),
    "ERROR lines": re.compile(r"\| ERROR +\||Error logging to API"),
    "tracebacks": re.compile(r"^Traceback"),
}


def count_lines(folder: Path) -> dict[str, dict[str, int]]:
    """For each log under folder (server, worker-N: the trials' output too, sweep), the lines
    that match each pattern."""
    counts = {}
    for log in sorted(folder.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        counts[log.stem] = {name: sum(bool(pattern.search(line)) for line in lines)
                            for name, pattern in PATTERNS.items()}  # fmt: skip
    return counts


def one_backend(database: str, work: Path, trials: int, concurrency: int) -> dict[str, Any]:
    env = clean_env(work / "prefect-home")
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    logs = work / "logs"
    logs.mkdir(parents=True)
    with postgres_server(work / "postgres") if database == "postgresql" else nullcontext() as pg:
        server_env = dict(env)
        if pg is not None:
            pg.create_database("prefect")
            server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = pg.url("prefect")
        with prefect_server(server_env, logs / "server.log") as api:
            client = {**env, "PREFECT_API_URL": api}
            prefect(client, "work-pool", "create", "ddpm-local", "--type", "process")
            prefect(client, "--no-prompt", "deploy", "--all",
                    "--prefect-file", "deployments/prefect.yaml")  # fmt: skip
            lrs = [1e-3, 5e-4, 2e-4, 1e-4, 5e-5, 2e-5][: max(1, trials // 2)]
            spec = {
                "name": f"bench-{database}", "deployment": "train-flow/ddpm-smoke",
                "concurrency": concurrency,
                "base": {"data.root": str(work / "data"), "run.dir": str(work / "runs"),
                         "wandb.mode": "disabled"},
                "vary": {"optim.lr": lrs, "model.hidden_size": [8, 16]},
            }  # fmt: skip
            (work / "spec.yaml").write_text(yaml.safe_dump(spec))
            with workers(client, ["worker-1", "worker-2"], "ddpm-local", logs):
                start = time.monotonic()
                with open(logs / "sweep.log", "wb") as out:
                    code = subprocess.call(
                        [str(Path(sys.executable).with_name("ddpm-sweep")), "--spec",
                         str(work / "spec.yaml")], env=client, cwd=work, stdout=out,
                        stderr=subprocess.STDOUT,
                    )  # fmt: skip
                wall = time.monotonic() - start
                overhead = _overhead(client, work) if database == "sqlite" else None
    record = json.loads((work / "runs" / "sweeps" / spec["name"] / "sweep.json").read_text())
    states = [t["state"] for t in record["trials"]]
    served_by = {  # the flow runs each worker took (the trials, and the overhead run)
        log.stem: len(set(re.findall(r"submitting flow run '([0-9a-f-]{36})'", log.read_text())))
        for log in sorted(logs.glob("worker-*.log"))
    }
    return {
        "database": database,
        "exit_code": code,
        "trials": len(states),
        "finished": states.count("Completed"),
        "states": states,
        "concurrency": concurrency,
        "sweep_wall_s": round(wall, 1),
        "flow_runs_submitted_by_worker": served_by,
        "log_lines": count_lines(logs),
        "trial_overhead": overhead,
    }


def _overhead(env: dict[str, str], work: Path) -> dict[str, float]:
    """The same tiny run as a plain command and through run_deployment (to its final state)."""
    overrides = {"data.root": str(work / "data"), "wandb.mode": "disabled",
                 "model.hidden_size": 16, "data.subset": 256, "diffusion.num_timesteps": 100,
                 "train.epochs": 2, "train.batch_size": 64, "train.device": "cpu",
                 "sample.num": 16, "sample.steps": 10, "optim.warmup_steps": 4}  # fmt: skip
    flags = [f"--{k}={v}" for k, v in overrides.items()]
    start = time.monotonic()
    subprocess.check_call(
        [sys.executable, str(REPO / "flows" / "train_flow.py"), *flags,
         f"--run.dir={work / 'plain'}"], env=env, cwd=work,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    plain = time.monotonic() - start

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        start = time.monotonic()
        flow_run = run_deployment(
            "train-flow/ddpm-smoke", timeout=0,
            parameters={"overrides": {**overrides, "run.dir": str(work / "deployed")}},
        )  # fmt: skip
        with get_client(sync_client=True) as client:
            while not (run := client.read_flow_run(flow_run.id)).state.is_final():
                time.sleep(0.25)
        deployed = time.monotonic() - start
    assert run.state.is_completed(), run.state
    return {
        "plain_command_s": round(plain, 1),
        "run_deployment_s": round(deployed, 1),
        "overhead_s": round(deployed - plain, 1),
        "started_after_s": round((run.start_time - run.expected_start_time).total_seconds(), 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="grid trials (even)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="sweeps per database")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        for attempt, database in enumerate(["sqlite", "postgresql"] * args.repeat):
            work = Path(tmp) / f"{database}-{attempt}"
            write_cifar10(work / "data", images_per_batch=52)
            result = one_backend(database, work, args.trials, args.concurrency)
            print(json.dumps(result), flush=True)
            results.append(result)
    report = {"machine": f"{os.cpu_count()} CPUs", "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
