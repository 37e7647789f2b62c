"""Real Prefect processes for the end-to-end tests and the sweep benchmark: a server (on SQLite
or PostgreSQL) bound to 127.0.0.1, process workers, and the `prefect` CLI, each in a session of
its own and stopped by process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from postgres import free_port

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def clean_env(home: Path) -> dict[str, str]:
    """This process's environment without PREFECT_* and DDPM_* variables, with a Prefect home
    of its own and telemetry off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DDPM_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def stop_group(process: subprocess.Popen, signum: int = signal.SIGTERM, wait: float = 20) -> None:
    """Send signum to the process's group; SIGKILL the group if it has not ended in `wait` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
    try:
        process.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def prefect_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 with `env`; yields its API URL once /api/health
    answers (Prefect exempts GET /api/health from the auth string); stops it by process group.
    Its UI (at the URL without /api) calls that API (--port alone leaves the UI on 4200)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={"PREFECT_UI_API_URL": api, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text()) from None
                time.sleep(0.5)
        yield api
    finally:
        stop_group(process)


@contextlib.contextmanager
def workers(env: dict[str, str], names: Sequence[str], pool: str, logs: Path) -> Iterator[None]:
    """Process workers of `pool` (one per name, logging to logs/<name>.log, run from the
    repository root as `prefect deploy` recorded it); stopped by process group at the end."""
    logs.mkdir(parents=True, exist_ok=True)
    started = []
    try:
        for name in names:
            with open(logs / f"{name}.log", "wb") as out:
                started.append(subprocess.Popen(
                    [PREFECT, "worker", "start", "--pool", pool, "--name", name],
                    env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                ))  # fmt: skip
        yield
    finally:
        for process in started:
            stop_group(process, signal.SIGINT, wait=30)


def prefect(env: dict[str, str], *args: str, timeout: int = 180) -> str:
    """`prefect ARGS` from the repository root; its output; fails the caller on an error."""
    result = subprocess.run(
        [PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr
