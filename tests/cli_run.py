"""`python flows/train_flow.py` (or sample_flow.py) as a real child process, for the tests that
signal or kill it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"step (\d+)  loss")


class Cli:
    """`python flows/train_flow.py` (or `script`) in a session of its own, its output read as
    it comes."""

    def __init__(
        self, env: dict[str, str], cwd: Path, *args: str, script: str | None = None
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, script or str(REPO / "flows" / "train_flow.py"), *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.last_step = 0
        self._step_seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._step_seen:
                self.lines.append(line)
                if m := STEP_LINE.search(line):
                    self.last_step = int(m[1])
                self._step_seen.notify_all()

    def wait_for_step(self, step: int, timeout: float = 240) -> None:
        with self._step_seen:
            assert self._step_seen.wait_for(
                lambda: self.last_step >= step or self.process.poll() is not None, timeout
            ), self.output[-3000:]
        assert self.last_step >= step, self.output[-3000:]

    def wait_for(self, seen: Callable[[str], bool], timeout: float = 240) -> None:
        """Wait until an output line satisfies `seen` (fails if the process ends first)."""
        with self._step_seen:
            assert self._step_seen.wait_for(
                lambda: any(map(seen, self.lines)) or self.process.poll() is not None, timeout
            ), self.output[-3000:]
        assert any(map(seen, self.lines)), self.output[-3000:]

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self._reader.join(timeout=10)

    @property
    def output(self) -> str:
        return "".join(self.lines)


def signal_group(cli: Cli, signum: int) -> float:
    """Send signum to the CLI's process group (as a scheduler or Ctrl-C does); returns when."""
    os.killpg(cli.process.pid, signum)
    return time.monotonic()
