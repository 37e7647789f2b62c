"""A Prefect server as a sweep would share it (issue 28): backed by a real PostgreSQL and guarded
by PREFECT_SERVER_API_AUTH_STRING. Clients with the string work; clients without it, or with a
wrong one, are refused; Prefect's tables really live in PostgreSQL."""

from __future__ import annotations

import base64
import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from benchmarks.postgres import missing, postgres_server
from benchmarks.prefect_stack import PREFECT, clean_env, prefect_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(missing() is not None, reason=str(missing())),
]


def filter_work_pools(api: str, auth: str | None) -> int:
    """POST /api/work_pools/filter with HTTP basic auth `auth` (none when None); the status."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(f"{api}/work_pools/filter", b"{}", headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def prefect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PREFECT, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow(seconds=20)
def test_auth_string_guards_a_postgres_backed_server(tmp_path: Path) -> None:
    """With PREFECT_SERVER_API_AUTH_STRING set, the CLI with the same PREFECT_API_AUTH_STRING
    creates and lists a work pool, while raw HTTP and the CLI without the string or with a wrong
    one get 401; the pool is a row of Prefect's tables in PostgreSQL, and no SQLite file exists."""
    auth = f"admin:{secrets.token_hex(16)}"
    env = clean_env(tmp_path / "prefect-home")
    with postgres_server(tmp_path / "postgres") as database:
        database.create_database("prefect")
        server_env = {
            **env,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": database.url("prefect"),
            "PREFECT_SERVER_API_AUTH_STRING": auth,
        }
        with prefect_server(server_env, tmp_path / "server.log") as api:
            anonymous = {**env, "PREFECT_API_URL": api}
            client = {**anonymous, "PREFECT_API_AUTH_STRING": auth}
            wrong = {**anonymous, "PREFECT_API_AUTH_STRING": "admin:wrong"}
            # The refused CLIs start first and run beside the accepted ones (2 s of imports each).
            refused = {
                name: subprocess.Popen(
                    [PREFECT, "work-pool", "ls"],
                    env=client_env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for name, client_env in (("no auth string", anonymous), ("wrong one", wrong))
            }
            created = prefect(client, "work-pool", "create", "auth-pool", "--type", "process")
            assert created.returncode == 0, created.stdout + created.stderr
            listed = prefect(client, "work-pool", "ls")
            assert listed.returncode == 0 and "auth-pool" in listed.stdout, listed.stderr

            assert filter_work_pools(api, auth) == 200
            assert filter_work_pools(api, None) == 401
            assert filter_work_pools(api, "admin:wrong") == 401
            for name, process in refused.items():
                output = process.communicate(timeout=120)[0]
                assert process.returncode == 1, f"{name}: {output}"
                assert "'401 Unauthorized'" in output, f"{name}: {output}"
                assert "auth-pool" not in output, f"{name}: {output}"

        with database.connect("prefect") as connection:
            pools = connection.execute("SELECT name, type FROM work_pool").fetchall()
        assert ("auth-pool", "process") in pools
    assert not list((tmp_path / "prefect-home").rglob("*.db"))  # no SQLite fallback
