"""Child processes a command starts (flows.children): they die with the command however it
dies, and stopping one stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows import children

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def gone(pid: int, timeout: float = 10) -> bool:
    """Whether pid has ended (a zombie counts: it runs nothing) within timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_children_started_from_a_busy_threaded_process_die_with_it(tmp_path: Path) -> None:
    """A process with eight busy threads starts five children (no preexec_fn runs Python in
    the forked child, so this is safe); SIGKILLed, each child gets its death signal and ends."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, sys, threading, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from flows import children

        def spin():
            while True:
                sum(range(1000))

        for _ in range(8):
            threading.Thread(target=spin, daemon=True).start()
        kids = [children.start({SLEEPER!r}, env=os.environ, stdout=None,
                               death_signal=signal.SIGTERM) for _ in range(5)]
        print(" ".join(str(k.pid) for k in kids), flush=True)
        time.sleep(120)
    """)
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(pids) == 5 and not any(gone(pid, timeout=0.5) for pid in pids)
    parent.kill()
    parent.wait()
    assert all(gone(pid) for pid in pids)


def test_stopping_a_child_stops_every_process_it_started() -> None:
    """stop() signals the child, and after the grace period SIGKILLs it and the processes it
    started, even one that made a session of its own (as a served deployment's flow runs
    do); the child's own exit status is collected."""
    spawner = [sys.executable, "-c", textwrap.dedent(f"""
        import signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child that does not stop when told
        subprocess.Popen({SLEEPER!r}, start_new_session=True)
        time.sleep(120)
    """)]  # fmt: skip
    child = children.start(spawner, env=os.environ, stdout=None, death_signal=signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not children.descendants(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    ((grandchild, _),) = children.descendants(child.pid)
    started = time.monotonic()
    children.stop(child, signal.SIGTERM, grace=1.0)
    assert 1.0 <= time.monotonic() - started < 10
    assert child.returncode == -signal.SIGKILL
    assert gone(grandchild)


def test_a_child_that_stops_when_told_is_not_killed() -> None:
    """A child that ends on the first signal is not SIGKILLed: stop returns at once with its
    own exit status."""
    child = children.start(SLEEPER, env=os.environ, stdout=None, death_signal=signal.SIGTERM)
    time.sleep(0.3)  # the trampoline has become the sleeper
    started = time.monotonic()
    children.stop(child, signal.SIGTERM, grace=10)
    assert time.monotonic() - started < 5 and child.returncode == -signal.SIGTERM
