"""Secrets are never written (issue 34): credentials come from the environment or the standard
files of their tools, never from a setting or a spec. Distinctive secrets planted everywhere a
user may put them are searched for in every file the runs and the sweep leave, every Prefect
artifact, flow-run parameter and log line read back through the API, and the W&B files."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_run import REPO
from prefect.client.orchestration import get_client

from flows.sweep_flow import local_runner, sweep_flow
from flows.train_flow import train_flow

# One distinctive secret per place a user may put one; none may be found anywhere.
PLACES = ("env-wandb", "env-pg", "env-prefect", "dotenv-wandb", "dotenv-pg", "flag", "spec",
          "parameter")  # fmt: skip


def everything_written(root: Path, users: set[Path]) -> list[Path]:
    """Every file under root, but the user's own (the .env and the specs they wrote)."""
    return [p for p in root.rglob("*") if p.is_file() and p not in users]


def read_back() -> dict[str, list[str]]:
    """Every flow run's parameters, artifact and log line on the test's Prefect server, as
    text: {"parameters:<flow run id>": [...], "artifacts": [...], "logs": [...]}."""

    def every(read: Any) -> list[Any]:  # the API answers at most 200 at a time
        items: list[Any] = []
        while batch := read(limit=200, offset=len(items)):
            items += batch
        return items

    found: dict[str, list[str]] = {}
    with get_client(sync_client=True) as client:
        runs = every(client.read_flow_runs)
        for run in runs:
            found[f"parameters:{run.id}"] = [json.dumps(run.parameters, default=str)]
        found["states"] = [run.state.message or "" for run in runs if run.state]
        found["artifacts"] = [json.dumps(a.data, default=str) + (a.description or "")
                              for a in every(client.read_artifacts)]  # fmt: skip
        found["logs"] = [log.message for log in every(client.read_logs)]
    return found


@pytest.mark.slow(seconds=90)
def test_planted_secrets_are_written_nowhere(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cifar_writer, cli_env
) -> None:
    """Secrets in the environment (WANDB_API_KEY, PGPASSWORD, PREFECT_API_AUTH_STRING) and in
    `.env` are used by their tools and written by none of ours; a password in a flag, a spec
    or a deployment parameter (a storage or mirror URL) is refused in one line that masks it.
    After a training run, a refused run, a refused flag, a refused spec and a one-trial sweep
    served from this machine: no planted secret in any file, artifact, log line or W&B file,
    and in flow-run parameters only in the one run it was sent to (Prefect keeps a run's
    parameters as sent, before any code of ours sees them)."""
    planted = {place: f"s3cret-{place}-{secrets.token_hex(6)}" for place in PLACES}
    monkeypatch.setenv("WANDB_API_KEY", planted["env-wandb"])
    monkeypatch.setenv("PGPASSWORD", planted["env-pg"])
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", f"admin:{planted['env-prefect']}")
    dotenv = tmp_path / ".env"  # the working folder's, which the settings read
    dotenv.write_text(f"WANDB_API_KEY={planted['dotenv-wandb']}\n"
                      f"PGPASSWORD={planted['dotenv-pg']}\n")  # fmt: skip
    offline = {**tiny, "wandb.mode": "offline", "train.epochs": 1}

    # 1. A run: W&B offline (a key in the environment would otherwise take it online).
    state = train_flow(overrides=offline, return_state=True)
    assert state.is_completed(), state.message

    # 2. A deployment parameter carrying a password: the run fails at once, masked.
    url = f"https://mirror:{planted['parameter']}@mirror.example/cifar-10-python.tar.gz"
    refused = train_flow(overrides={**offline, "data.url": url}, return_state=True)
    assert refused.is_failed() and "mirror:***@mirror.example" in refused.message
    assert planted["parameter"] not in refused.message

    # 3. A flag carrying one: exit 2 before anything starts, one masked line.
    storage = f"postgresql+psycopg://optuna:{planted['flag']}@db.example/optuna"
    flagged = subprocess.run(
        [sys.executable, str(REPO / "flows" / "train_flow.py"), "--sweep.storage", storage,
         "--sweep.study", "s", "--sweep.trial", "0"],
        env=cli_env(offline), cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert flagged.returncode == 2 and "optuna:***@db.example" in flagged.stderr
    assert len(flagged.stderr.strip().splitlines()) == 1, flagged.stderr

    # 4. A spec carrying one: exit 2 before anything starts, one masked line.
    cifar_writer(tmp_path / "data", images_per_batch=52)
    base = {"data.root": str(tmp_path / "data"), "run.dir": str(tmp_path / "runs"),
            "wandb.mode": "offline", "train.epochs": 1}  # fmt: skip
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text(yaml.safe_dump({
        "name": "leaky", "search": "tpe", "trials": 1, "vary": {"optim.lr": [1e-3]},
        "storage": f"postgresql+psycopg://optuna:{planted['spec']}@db.example/optuna",
        "deployment": "train-flow/ddpm-smoke", "base": base,
    }))  # fmt: skip
    specced = subprocess.run(
        [sys.executable, str(REPO / "flows" / "sweep_flow.py"), "--spec", str(bad_spec)],
        env=cli_env({}), cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert specced.returncode == 2 and "optuna:***@db.example" in specced.stderr
    assert len(specced.stderr.strip().splitlines()) == 1, specced.stderr

    # 5. A one-trial sweep, its deployment served from this machine with the secrets in its
    # environment (the trials' log holds whatever the served runs printed).
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"name": "quiet", "deployment": "train-flow/ddpm-smoke",
                                    "base": base, "vary": {"optim.lr": [1e-3]}}))  # fmt: skip
    folder = tmp_path / "runs" / "sweeps" / "quiet"
    with local_runner("train-flow/ddpm-smoke", 1, 120, folder / "trials.log"):
        swept = sweep_flow(str(spec), poll_seconds=0.5, return_state=True)
    assert swept.is_completed(), swept.message
    assert swept.result()["trials"][0]["state"] == "Completed"

    files = everything_written(tmp_path, {dotenv, spec, bad_spec})
    assert any(p.suffix == ".wandb" for p in files) and (folder / "trials.log").stat().st_size
    found = [(place, str(p)) for p in files for place, s in planted.items()
             if s.encode() in p.read_bytes()]  # fmt: skip
    for where, texts in read_back().items():
        for place, secret in planted.items():
            if any(secret in text for text in texts):
                found.append((place, where))
    sent_to = f"parameters:{refused.state_details.flow_run_id}"
    assert found == [("parameter", sent_to)], found
