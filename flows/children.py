"""Child processes a command starts and must not leave behind (the temporary Prefect server, a
sweep's served deployment): each in a session of its own, so the signal a scheduler or Ctrl-C
sends to the command's group does not reach it before the command has used it; told to die
with the command however it dies (Linux's parent-death signal); and stopped with every process
it started.

The parent-death signal is set by the child itself, after exec, in a one-line Python
trampoline that then execs the real command: a `preexec_fn` would run Python (and ctypes) in
the forked child, which is not safe once the parent has threads, and it keeps subprocess from
its thread-safe vfork/posix_spawn paths.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
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
    """Send `signum` to the child, wait up to `grace` seconds for it to end, then SIGKILL it
    and every process it started that is still there (its whole tree, including processes
    that made sessions of their own: a served deployment's flow runs)."""
    tree = descendants(process.pid)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    if process.poll() is None:
        tree += descendants(process.pid)
        process.kill()
    for pid, started in tree:
        if _started(pid) == started:  # still that process, not another with its number
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    process.wait()


def descendants(pid: int) -> list[tuple[int, int]]:
    """The processes started by `pid`, and by those, ..., each as (pid, start time) (Linux:
    read from /proc; elsewhere none are known)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat(int(entry.name))
            children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command's name: fields 3 (state), 4 (ppid), ... 22 (start
    time) at indices 0, 1, ... 19 (the name may hold spaces and ')')."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _started(pid: int) -> int | None:
    try:
        return int(_stat(pid)[19])
    except (OSError, ValueError, IndexError):
        return None
