"""Child processes a command starts and must not leave behind (the temporary Prefect server, a
sweep's served deployment, the test and benchmark harness's servers and workers): `running`
starts one, waits until it is ready, and stops it with everything it started.

Each runs in a session of its own, so the signal a scheduler or Ctrl-C sends to the command's
group does not reach it before the command has used it; it is told to die with the command
however it dies (Linux's parent-death signal); and it is stopped with its whole session and
every process it started.

The parent-death signal is set by the child itself, after exec, in a one-line Python
trampoline that then execs the real command: a `preexec_fn` would run Python (and ctypes) in
the forked child, which is not safe once the parent has threads, and it keeps subprocess from
its thread-safe vfork/posix_spawn paths.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# argv: parent pid, signal, command... Set the signal, then make sure the parent did not die
# before it was set (the child would then never get it), then become the command.
_TRAMPOLINE = (
    "import ctypes, os, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, int(sys.argv[2]))\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(1)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)
POLL_SECONDS = 0.25  # between two readiness checks
TAIL_LINES = 20  # of the child's output, in the error when it did not become ready
_TAIL_BYTES = 16384  # read from the end of its log for them


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of `host` that no process listens on now (the system's pick). Another process
    may take it before the caller's server binds it: that server then fails, and says so."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class StartError(RuntimeError):
    """A child exited, or was not ready within its timeout, before its readiness check passed.

    Attributes:
        command: the command's argv.
        returncode: its exit status; None when it was still running at the timeout.
        timeout: the seconds it was given.
        tail: the last lines of its output (at most TAIL_LINES).
        log: the file its output went to; None for a temporary one, now gone.
    """

    def __init__(
        self,
        command: Sequence[str],
        returncode: int | None,
        timeout: float,
        tail: list[str],
        log: Path | None,
    ) -> None:
        self.command, self.returncode, self.timeout = list(command), returncode, timeout
        self.tail, self.log = tail, log
        shown = shlex.join([Path(command[0]).name, *command[1:]])
        what = (
            f"was not ready within {timeout:g} s"
            if returncode is None
            else f"exited with status {returncode} before it was ready"
        )
        where = f" ({log})" if log is not None else ""
        output = "".join(f"\n    {line}" for line in tail) if tail else " nothing"
        super().__init__(f"`{shown}` {what}; the end of its output{where}:{output}")


@contextlib.contextmanager
def running(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    ready: Callable[[], bool] | None = None,
    timeout: float = 60.0,
    log: Path | None = None,
    cwd: Path | None = None,
    stop_signal: int = signal.SIGTERM,
    grace: float = 5.0,
) -> Iterator[subprocess.Popen]:
    """Start `command` in a session of its own (`start`), wait until it is ready, yield it, and
    stop it with its whole session and every process it started (`stop`) on the way out,
    however the body ends.

    Args:
        command: argv, argv[0] a path (e.g. sys.executable).
        env: its whole environment.
        ready: called every POLL_SECONDS until it returns True; None: do not wait.
        timeout: seconds `ready` has to pass.
        log: the file its stdout and stderr are appended to (its folder made if missing);
            None: a temporary file, read only for the error below.
        cwd: its working directory; None: this process's.
        stop_signal: what asks it to stop, at the end and when this process dies (its
            parent-death signal on Linux).
        grace: seconds from `stop_signal` to SIGKILL.

    Raises:
        StartError: if it exited, or `ready` did not pass within `timeout` seconds; it names
            the command and holds the end of its output.
    """
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a+b") if log is not None else tempfile.TemporaryFile() as out:
        begin = out.seek(0, os.SEEK_END)  # a log appended to: this start's output only
        process = start(command, env=env, stdout=out, death_signal=stop_signal, cwd=cwd)
        try:
            deadline = time.monotonic() + timeout
            while ready is not None and not ready():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise StartError(command, process.poll(), timeout, _tail(out, begin), log)
                time.sleep(POLL_SECONDS)
            yield process
        finally:
            stop(process, stop_signal, grace)


def _tail(out: IO[bytes], begin: int) -> list[str]:
    """The last TAIL_LINES non-blank lines written to `out` after offset `begin` (read with
    pread: the child shares the file's offset)."""
    size = os.fstat(out.fileno()).st_size
    start_at = max(begin, size - _TAIL_BYTES)
    text = os.pread(out.fileno(), size - start_at, start_at).decode(errors="replace")
    return [line.rstrip() for line in text.splitlines() if line.strip()][-TAIL_LINES:]


def start(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: IO[bytes] | int | None,
    death_signal: int,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """Start `command` (argv[0] a path, e.g. sys.executable) in a session of its own; on Linux
    it gets `death_signal` when this process dies, even by SIGKILL; its stderr goes to stdout.
    """
    argv = list(command)
    if sys.platform == "linux":
        argv = [sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), str(int(death_signal)),
                *argv]  # fmt: skip
    return subprocess.Popen(
        argv, env=dict(env), cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def stop(process: subprocess.Popen, signum: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Stop a child that `start` started, with its whole session: send `signum` to its process
    group, wait up to `grace` seconds for the child to end, then SIGKILL it and whatever is
    left of its session and of the processes it started (its whole tree, including processes
    that made sessions of their own: a served deployment's flow runs)."""
    left = _family(process.pid)
    if process.poll() is None:  # not reaped: its number still names its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    if process.poll() is None:
        left += _family(process.pid)
        process.kill()
    # Those it left in its session (numbers are handed out in turn, so not yet another's).
    left += _family(process.pid)
    for pid, started in left:
        if _started(pid) == started:  # still that process, not another with its number
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    process.wait()


def descendants(pid: int) -> list[tuple[int, int]]:
    """The processes started by `pid`, and by those, ..., each as (pid, start time) (Linux:
    read from /proc; elsewhere none are known)."""
    return _descendants(pid, _processes())


def _descendants(pid: int, processes: list[tuple[int, int, int, int]]) -> list[tuple[int, int]]:
    children: dict[int, list[tuple[int, int]]] = {}
    for child, parent, _, started in processes:
        children.setdefault(parent, []).append((child, started))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _family(leader: int) -> list[tuple[int, int]]:
    """The rest of the session `leader` leads, and every process it started, as (pid, start
    time)."""
    processes = _processes()
    session = [(pid, started) for pid, _, sid, started in processes if sid == leader != pid]
    return list(dict.fromkeys(session + _descendants(leader, processes)))


def _processes() -> list[tuple[int, int, int, int]]:
    """Every process as (pid, parent, session, start time) (Linux: read from /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat(int(entry.name))
            found.append((int(entry.name), int(fields[1]), int(fields[3]), int(fields[19])))
    return found


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command's name: fields 3 (state), 4 (ppid), 5 (pgrp),
    6 (session), ... 22 (start time) at indices 0, 1, 2, 3, ... 19 (the name may hold spaces
    and ')')."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _started(pid: int) -> int | None:
    try:
        return int(_stat(pid)[19])
    except (OSError, ValueError, IndexError):
        return None
