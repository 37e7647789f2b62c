"""The temporary Prefect server a run starts when no PREFECT_API_URL is set.

Prefect's own temporary server runs in the run's process group, so the SIGTERM or SIGINT a
scheduler or Ctrl-C sends to the group killed it first, and the run then hung retrying calls
to it. This one is started in a session of its own (a signal to the run's group does not reach
it), dies with the run on Linux (the parent-death signal, even when the run is SIGKILLed;
flows.children), waits run.server_timeout for the server to answer, and does not send
telemetry unless PREFECT_SERVER_ANALYTICS_ENABLED says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator

from ddpm.errors import UserError
from flows import children
from flows.shutdown import api_answers, at_hard_exit


class ServerError(UserError):
    """The temporary server did not start in time; the message says what to change."""


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def temporary_server(timeout: float) -> Iterator[str]:
    """Start Prefect's API (no UI) on a free port of 127.0.0.1; yield its API URL; stop it.

    Args:
        timeout: seconds to wait for it to answer (run.server_timeout).

    Raises:
        ServerError: if it did not answer in time, or exited; names run.server_timeout.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",  # what Prefect's own temporary server sets
        "PREFECT__SERVER_FINAL": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get(
            "PREFECT_SERVER_ANALYTICS_ENABLED", "false"
        ),
    }
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        server = children.start(command, env=env, stdout=log, death_signal=signal.SIGTERM)
        at_hard_exit(server.terminate)  # a hard exit skips the finally below
        try:
            deadline = time.monotonic() + timeout
            while not api_answers(url):
                if server.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace").strip().splitlines()[-1:]
                    raise ServerError(
                        f"the temporary Prefect server exited with status {server.returncode}"
                        f"{': ' + tail[0] if tail else ''}"
                    )
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"the temporary Prefect server did not answer within {timeout:g} s "
                        "(run.server_timeout; raise it on a busy machine, e.g. "
                        "--run.server_timeout 300, or set PREFECT_API_URL to a running server)"
                    )
                time.sleep(0.2)
            yield url
        finally:
            children.stop(server, signal.SIGTERM, grace=5)  # SIGKILL after 5 s
