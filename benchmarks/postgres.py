"""A real PostgreSQL for the tests and the sweep benchmark: `postgres_server(folder)` creates a
throwaway cluster (initdb), starts it on a free port of 127.0.0.1 with password (scram-sha-256)
logins, yields how to reach it, and stops it on exit even when the body raises. pg_ctl starts,
waits for and stops it (the postmaster detaches, and runs as `nobody` below), so it is not one
of flows.children's.

initdb and postgres refuse to run as root, and these machines run tests as root: the cluster
then belongs to `nobody`. It lives in a short folder under the system temp dir, which `nobody`
can reach (pytest's tmp_path sits under a root-only 0700 folder) and whose socket path stays
under the 107-byte limit; its log goes to `folder/postgres.log`.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from flows.children import free_port

BINARIES = ("initdb", "pg_ctl", "postgres")
# Durability off: a test's cluster is thrown away, so CREATE DATABASE and migrations need not
# wait for the disk.
OPTIONS = "-c fsync=off -c full_page_writes=off -c synchronous_commit=off"


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str, driver: str = "asyncpg") -> str:
        """A SQLAlchemy URL, e.g. postgresql+asyncpg://postgres:PW@127.0.0.1:PORT/prefect;
        driver "psycopg" names SQLAlchemy's psycopg 3 driver."""
        return (
            f"postgresql+{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"
        )

    def connect(self, database: str = "postgres"):
        """A psycopg connection over TCP, with the password (autocommit)."""
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            autocommit=True,
        )

    def create_database(self, name: str) -> None:
        with self.connect() as connection:
            connection.execute(f'CREATE DATABASE "{name}"')


def missing() -> str | None:
    """Why PostgreSQL cannot run here (a binary not on the PATH), or None when it can."""
    for binary in BINARIES:
        if shutil.which(binary) is None:
            return f"PostgreSQL's {binary} is not on the PATH"
    return None


def _run_as() -> dict:
    """Popen arguments that drop root to `nobody`; none when not root."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


@contextmanager
def postgres_server(folder: Path) -> Iterator[PostgresServer]:
    """Start PostgreSQL on 127.0.0.1 (superuser `postgres`, a random password); stop it on exit.

    Raises:
        RuntimeError: when initdb, pg_ctl or postgres is not on the PATH (`missing`).
    """
    if why := missing():
        raise RuntimeError(why)
    server = PostgresServer("127.0.0.1", free_port(), "postgres", secrets.token_hex(16))
    user = _run_as()
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    data = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "postgres.log", "wb")  # noqa: SIM115 -- held by the postmaster
    env = {"PATH": os.environ["PATH"], "LC_ALL": "C"}

    def pg(*args: str, timeout: float = 60) -> None:
        # The log is our file handed down as stdout: `nobody` cannot open it in `folder`.
        result = subprocess.run(
            args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, **user
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed:\n{(folder / 'postgres.log').read_text()}")

    try:
        (root / "pwfile").write_text(server.password)
        if user:
            for path in (root, root / "pwfile"):
                os.chown(path, user["user"], user["group"])
        pg(
            "initdb", "-D", str(data), "-U", server.user, "--pwfile", str(root / "pwfile"),
            "-A", "scram-sha-256", "--no-sync", "--no-instructions", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        listen = f"-c listen_addresses={server.host} -p {server.port} -k {root} {OPTIONS}"
        pg("pg_ctl", "start", "-w", "-t", "60", "-D", str(data), "-o", listen, timeout=90)
        try:
            server.connect().close()  # TCP and the password accepted, not only the socket
            yield server
        finally:
            try:
                pg("pg_ctl", "stop", "-w", "-t", "20", "-m", "fast", "-D", str(data), timeout=30)
            except (RuntimeError, subprocess.TimeoutExpired):
                with suppress(OSError, ValueError):  # no pid file: nothing to kill
                    os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
    finally:
        log.close()
        shutil.rmtree(root, ignore_errors=True)
