"""Real Prefect processes for the end-to-end tests and the sweep benchmark: a server (on SQLite
or PostgreSQL) bound to 127.0.0.1, process workers, and the `prefect` CLI. The server and the
workers are flows.children's: each in a session of its own, gone with this process however it
ends, and stopped with every process it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from flows.children import free_port, running
from flows.shutdown import api_answers

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def clean_env(home: Path) -> dict[str, str]:
    """This process's environment without PREFECT_* and DDPM_* variables, with a Prefect home
    of its own and telemetry off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DDPM_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


@contextlib.contextmanager
def prefect_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 with `env`, its output in `log`; yields its API URL
    once /api/health answers (Prefect exempts GET /api/health from the auth string), within
    120 s (else flows.children.StartError, with the end of the log); stopped at the end
    (SIGTERM, SIGKILL after 20 s). Its UI (at the URL without /api) calls that API (--port
    alone leaves the UI on 4200)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    env = {"PREFECT_UI_API_URL": api, **env}
    with running(command, env=env, ready=lambda: api_answers(api), timeout=120, log=log,
                 grace=20):  # fmt: skip
        yield api


@contextlib.contextmanager
def workers(env: dict[str, str], names: Sequence[str], pool: str, logs: Path) -> Iterator[None]:
    """Process workers of `pool` (one per name, logging to logs/<name>.log, run from the
    repository root as `prefect deploy` recorded it); stopped at the end (SIGINT, SIGKILL
    after 30 s)."""
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(running(
                [PREFECT, "worker", "start", "--pool", pool, "--name", name], env=env,
                log=logs / f"{name}.log", cwd=REPO, stop_signal=signal.SIGINT, grace=30,
            ))  # fmt: skip
        yield


def prefect(env: dict[str, str], *args: str, timeout: int = 180) -> str:
    """`prefect ARGS` from the repository root; its output; fails the caller on an error."""
    result = subprocess.run(
        [PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr
