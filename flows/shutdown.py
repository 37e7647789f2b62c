"""Stopping a run cleanly: signals and a lost Prefect API become a stop request that the
training loop honours between two steps, with a deadline that nothing can outlast.

- The first SIGTERM or SIGINT asks the run to stop: the step under way finishes, a checkpoint
  is written, tracking and Prefect are told, and the process exits with 128 + the signal's
  number. If that has not happened run.stop_timeout seconds after the signal, the process
  exits then, with the same status.
- A second signal exits at once (the newest checkpoint on disk is where the run resumes).
- When the Prefect API stops answering, the run saves its state and exits with status 75
  (EX_TEMPFAIL: try again later), because every further task would wait minutes on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

EXIT_API_LOST = 75  # sysexits.h EX_TEMPFAIL: the run can be resumed once the API is back
_hard_exit_hooks: list[Callable[[], None]] = []
_active: StopRequest | None = None  # the one whose signal handlers are installed


def active_stop_request() -> StopRequest | None:
    """The stop request taking this process's signals, if any (the command line's)."""
    return _active


def at_hard_exit(hook: Callable[[], None]) -> None:
    """Run hook (quick, never raising) before a hard exit, which skips atexit and finally."""
    _hard_exit_hooks.append(hook)


def hard_exit(code: int, message: str) -> None:
    """Print message as the last line, run the hard-exit hooks, exit now with code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    for hook in _hard_exit_hooks:
        with contextlib.suppress(Exception):
            hook()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(code)


class StopRequest:
    """Whether the run has been asked to stop, and why; call it for a bool.

    Args:
        timeout: seconds from the request to a hard exit (run.stop_timeout).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.reason: str | None = None  # e.g. "SIGTERM received"
        self.exit_code = 0
        self.api_lost = False  # nothing can be reported to Prefect any more
        self.checkpoint: str | None = None  # the newest checkpoint on disk, for the last line
        self._training = False  # a training loop is running, and will honour the request
        self._unsaved: Callable[[], str] | None = None  # writes state that is not on disk yet
        self._on_leave: list[Callable[[], None]] = []
        self._lock = threading.RLock()

    def __call__(self) -> bool:
        return self.reason is not None

    def request(
        self, reason: str, exit_code: int, *, api_lost: bool = False, deadline: bool = True
    ) -> bool:
        """Ask the run to stop (only the first request counts); start the deadline (unless
        `deadline` is off: a request recorded after the run has stopped).

        Returns:
            whether this was the first request.
        """
        with self._lock:
            if self.reason is not None:
                return False
            self.reason, self.exit_code, self.api_lost = reason, exit_code, api_lost
        if api_lost:
            # Prefect's log worker would print a traceback for each batch it cannot send.
            logging.raiseExceptions = False
        if deadline:
            threading.Thread(target=self._deadline, name="stop-deadline", daemon=True).start()
        return True

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Mark a training loop that honours the request (it saves, then calls `leave`)."""
        with self._lock:
            self._training = True
        try:
            yield
        finally:
            with self._lock:
                self._training = False

    def unsaved(self, save: Callable[[], str] | None) -> None:
        """Register how to write state that is not on disk yet (None once it is), so that a
        lost API, which ends the run from the watching thread, loses nothing; leave at once
        if the API is already lost."""
        with self._lock:
            self._unsaved = save
            leave_now = self.api_lost
        if leave_now:
            self.leave()

    def on_leave(self, hook: Callable[[], None]) -> None:
        """Run hook (ending tracking, say) before `leave` exits."""
        self._on_leave.append(hook)

    def leave(self) -> None:
        """Write any unsaved state, run the on-leave hooks, exit now with the request's code
        and one line: for a lost API, whose every call would wait minutes."""
        with self._lock:
            save, self._unsaved = self._unsaved, None
            if save is not None:
                self.checkpoint = save()
        for hook in self._on_leave:
            with contextlib.suppress(Exception):
                hook()
        hard_exit(
            self.exit_code,
            f"{self.reason}; newest checkpoint {self.checkpoint}; re-run the same command to "
            "resume",
        )

    def _api_lost(self, url: str) -> None:
        with self._lock:
            self.request(
                f"the Prefect API at {url} stopped answering", EXIT_API_LOST, api_lost=True
            )
            leave_now = not self._training  # else the loop saves its step, then leaves
        if leave_now:
            self.leave()

    def _deadline(self) -> None:
        time.sleep(self.timeout)
        hard_exit(
            self.exit_code,
            f"{self.reason}; the run did not stop within run.stop_timeout ({self.timeout:g} s), "
            "so it exits now; re-run the same command to resume from its newest checkpoint",
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if not self.request(f"{name} received", 128 + signum):
            hard_exit(
                128 + signum,
                f"second {name}: stopping at once; re-run the same command to resume from "
                "the newest checkpoint",
            )
        print(
            f"{name}: stopping after the current step and saving a checkpoint (within "
            f"{self.timeout:g} s; press Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @contextlib.contextmanager
    def signals_handled(self) -> Iterator[StopRequest]:
        """Turn SIGTERM and SIGINT into stop requests while inside; restore the handlers after.
        Outside the main thread (where Python cannot take signals) this does nothing.

        Nests: a flow run installs Prefect's own SIGTERM handler (which raises inside whatever
        runs, mid-step too), so train_flow enters this again inside the run."""
        global _active
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        outer, _active = _active, self
        try:
            yield self
        finally:
            _active = outer
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def watching_api(self, url: str | None, every: float = 1.0, misses: int = 3) -> Iterator[None]:
        """Stop the run (api_lost) when the Prefect API at url fails `misses` health checks in
        a row, `every` seconds apart: a training loop stops after its step and saves it;
        otherwise the run saves what is unsaved and leaves at once. url None watches
        nothing."""
        if url is None:
            yield
            return
        done = threading.Event()

        def watch() -> None:
            failed = 0
            while not done.wait(every):
                failed = 0 if api_answers(url) else failed + 1
                if failed >= misses:
                    self._api_lost(url)
                    return

        watcher = threading.Thread(target=watch, name="api-watch", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()


def api_answers(url: str) -> bool:
    """Whether a Prefect API answers its health check within 2 s."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
