"""A run's place on disk: the one module that knows the run folder's layout.

runs/<run name>/
    settings.json            the resolved settings
    lock                     held (flock) by the process training the run, which it names
    wandb_id.txt             the W&B run id, so a resumed run continues it
    checkpoints/epoch_001.pt (+ .sha256), step_0000400.pt (mid-epoch), ...
    checkpoints/best.pt (+ .sha256), best.json   the checkpoint with the lowest FID, and its FID
    samples/epoch_001.png    the sample grid after epoch 1, ...
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ddpm.errors import UserError

_EPOCH_CHECKPOINT = re.compile(r"^epoch_(\d+)\.pt$")
_STEP_CHECKPOINT = re.compile(r"^step_(\d+)\.pt$")


class RunInUse(UserError):
    """Another process holds the run folder's lock."""


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's files; creates nothing."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def settings_file(self) -> Path:
        return self.path / "settings.json"

    @property
    def wandb_id_file(self) -> Path:
        return self.path / "wandb_id.txt"

    @property
    def lock_file(self) -> Path:
        return self.path / "lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run folder for this process: an exclusive lock (flock) on its lock file,
        which the OS releases when the process ends however it ends, so a crash never leaves
        a stale lock. The file holds the holder's PID, for the message of the next one.

        Raises:
            RunInUse: at once, naming the folder and the holder's PID, if another process
                holds it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise RunInUse(
                    f"{self.path} is in use by process {holder}, which is training this run; "
                    "wait for it to end or stop it (a second process would interleave its "
                    "checkpoints)"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    @property
    def best_checkpoint(self) -> Path:
        """checkpoints/best.pt: the evaluated checkpoint with the lowest FID."""
        return self.checkpoints / "best.pt"

    @property
    def best_record(self) -> Path:
        """checkpoints/best.json: best.pt's epoch and FID."""
        return self.checkpoints / "best.json"

    def epoch_checkpoint(self, epoch: int) -> Path:
        """checkpoints/epoch_XXX.pt, epochs numbered from 1."""
        return self.checkpoints / f"epoch_{epoch:03d}.pt"

    def step_checkpoint(self, global_step: int) -> Path:
        """checkpoints/step_XXXXXXX.pt: a mid-epoch checkpoint after `global_step` steps."""
        return self.checkpoints / f"step_{global_step:07d}.pt"

    def grid(self, epoch: int) -> Path:
        """samples/epoch_XXX.png: the sample grid drawn after an epoch."""
        return self.samples / f"epoch_{epoch:03d}.png"

    def epoch_checkpoints(self) -> list[Path]:
        """The epoch checkpoints, oldest epoch first."""
        return self._numbered(_EPOCH_CHECKPOINT)

    def step_checkpoints(self) -> list[Path]:
        """The mid-epoch checkpoints, oldest first."""
        return self._numbered(_STEP_CHECKPOINT)

    def _numbered(self, pattern: re.Pattern[str]) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m[1]), p) for p in self.checkpoints.iterdir() if (m := pattern.match(p.name))]
        return [p for _, p in sorted(found)]
