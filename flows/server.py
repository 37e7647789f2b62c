"""The temporary Prefect server a run starts when no PREFECT_API_URL is set.

Prefect's own temporary server runs in the run's process group, so the SIGTERM or SIGINT a
scheduler or Ctrl-C sends to the group killed it first, and the run then hung retrying calls
to it. This one is `prefect server start` (API only, on a free port of 127.0.0.1), as Prefect
documents running a server, started in a session of its own (a signal to the run's group does
not reach it); it dies with the run on Linux (the parent-death signal, even when the run is
SIGKILLed; flows.children), is waited for run.server_timeout to answer its /api/health, and
does not send telemetry unless PREFECT_SERVER_ANALYTICS_ENABLED says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

from ddpm.errors import UserError
from flows import children
from flows.shutdown import api_answers, at_hard_exit


class ServerError(UserError):
    """The temporary server did not start in time; the message says what to change."""


@contextlib.contextmanager
def temporary_server(timeout: float) -> Iterator[str]:
    """Start Prefect's API (no UI) on a free port of 127.0.0.1; yield its API URL; stop it.

    Args:
        timeout: seconds to wait for it to answer (run.server_timeout).

    Raises:
        ServerError: if it did not answer in time, or exited; names run.server_timeout.
    """
    port = children.free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get(
            "PREFECT_SERVER_ANALYTICS_ENABLED", "false"
        ),
    }
    # Its log (a temporary file) at WARNING: no line per request, however long the run.
    command = [
        sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
        "--port", str(port), "--no-ui", "--log-level", "WARNING",
    ]  # fmt: skip
    started = children.running(
        command, env=env, ready=lambda: api_answers(url), timeout=timeout,
        stop_signal=signal.SIGTERM, grace=5,  # SIGKILL after 5 s
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(started)
        except children.StartError as err:
            raise ServerError(_why(err)) from None
        at_hard_exit(server.terminate)  # a hard exit skips the stack's clean-up
        yield url


def _why(err: children.StartError) -> str:
    if err.returncode is None:
        return (
            f"the temporary Prefect server did not answer within {err.timeout:g} s "
            "(run.server_timeout; raise it on a busy machine, e.g. "
            "--run.server_timeout 300, or set PREFECT_API_URL to a running server)"
        )
    # Prefect's command prints "Server stopped!" last however the server ends.
    said = [line.strip() for line in err.tail if line.strip() != "Server stopped!"]
    return (
        f"the temporary Prefect server exited with status {err.returncode}"
        f"{': ' + said[-1] if said else ''}"
    )
