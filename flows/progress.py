"""A progress bar on an interactive terminal (rich): steps of an epoch, steps of a sample grid.

It advances as steps are queued, which waits for nothing; the loss shown is the last one read
from the device (every train.log_every steps). Off when stderr is not a terminal (logs, CI).
"""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressBar:
    """One bar of `total` steps, used as a context manager.

    Args:
        label: what is counted, e.g. "epoch 3/100".
        total: steps to the end.
        done: steps already done (a resumed epoch).
        console: where to draw; default stderr, and only when it is a terminal.
    """

    def __init__(
        self, label: str, total: int, done: int = 0, console: Console | None = None
    ) -> None:
        if console is None and sys.stderr.isatty():
            console = Console(stderr=True)
        self._progress = None
        if console is not None:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._progress.add_task(label, total=total, completed=done, note="")

    @property
    def completed(self) -> int:
        """Steps counted so far (0 when no bar is drawn)."""
        if self._progress is None:
            return 0
        return int(self._progress.tasks[0].completed)

    def advance(self, steps: int = 1) -> None:
        """Count `steps` more steps."""
        if self._progress is not None:
            self._progress.advance(self._task, steps)

    def note(self, text: str) -> None:
        """Show text beside the bar (the latest loss)."""
        if self._progress is not None:
            self._progress.update(self._task, note=text)

    def __enter__(self) -> ProgressBar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
