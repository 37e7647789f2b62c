"""A run's place on disk: the one module that knows the run folder's layout.

runs/<run name>/
    settings.json            the resolved settings
    wandb_id.txt             the W&B run id, so a resumed run continues it
    checkpoints/epoch_001.pt (+ .sha256), step_0000400.pt (mid-epoch), ...
    samples/epoch_001.png    the sample grid after epoch 1, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_EPOCH_CHECKPOINT = re.compile(r"^epoch_(\d+)\.pt$")
_STEP_CHECKPOINT = re.compile(r"^step_(\d+)\.pt$")


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
