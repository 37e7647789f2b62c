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


def test_running_waits_until_ready_and_stops_the_whole_session(tmp_path: Path) -> None:
    """running() yields once its readiness check passes, appends the child's output to the
    log, and on exit stops the child and the rest of its session, even a process there that
    ignores the stop signal."""
    ready = tmp_path / "ready"
    child = [sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, signal, subprocess, time
        subprocess.Popen([{sys.executable!r}, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "time.sleep(120)"])  # same session, deaf to SIGTERM
        print("started", flush=True)
        time.sleep(0.5)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(120)
    """)]  # fmt: skip
    log = tmp_path / "logs" / "child.log"
    with children.running(
        child, env=os.environ, ready=ready.exists, timeout=30, log=log, grace=1
    ) as process:
        assert ready.exists() and process.poll() is None
        deadline = time.monotonic() + 10
        while not children.descendants(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        ((deaf, _),) = children.descendants(process.pid)
        assert os.getsid(deaf) == process.pid
    assert process.returncode == -signal.SIGTERM and gone(deaf)
    assert log.read_text() == "started\n"


def test_a_child_that_exits_before_it_is_ready_is_an_error_naming_it_with_its_output(
    tmp_path: Path,
) -> None:
    """A child that exits before its readiness check passes raises StartError with its exit
    status, its command and the end of its output (this start's only: the log is appended to)."""
    log = tmp_path / "child.log"
    log.write_text("an earlier start's line\n")
    failing = [sys.executable, "-c", "import sys; print('port in use'); sys.exit(3)"]
    with (
        pytest.raises(children.StartError) as raised,
        children.running(failing, env=os.environ, ready=lambda: False, log=log),
    ):
        pytest.fail("the body ran")
    err = raised.value
    assert err.returncode == 3 and err.tail == ["port in use"] and err.log == log
    message = str(raised.value)
    assert message.startswith(f"`{Path(sys.executable).name} -c ")
    assert "exited with status 3 before it was ready" in message
    assert message.endswith(f"({log}):\n    port in use")


def test_a_child_not_ready_in_time_is_an_error_and_is_stopped() -> None:
    """A child whose readiness check does not pass within the timeout raises StartError (no
    exit status, the timeout named) and is stopped; its output went to a temporary file."""
    before = set(children.descendants(os.getpid()))
    started = time.monotonic()
    with (
        pytest.raises(children.StartError, match=r"was not ready within 0\.5 s") as raised,
        children.running(SLEEPER, env=os.environ, ready=lambda: False, timeout=0.5),
    ):
        pytest.fail("the body ran")
    assert raised.value.returncode is None and raised.value.log is None
    assert time.monotonic() - started < 10
    assert set(children.descendants(os.getpid())) <= before


def test_free_port_is_free() -> None:
    """free_port() names a port of 127.0.0.1 that a server can bind at once."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", children.free_port()))
