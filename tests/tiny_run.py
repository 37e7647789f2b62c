"""The one build configuration the tests share: a tiny CPU run, changed per test, and its data.

Importable from any test module (pyproject puts tests/ on the path): `from tiny_run import
make_config`; tests that take fixtures use `tiny_config` (conftest.py) instead.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddpm.config import Config, TrainConfig
from ddpm.trainer import EpochResult, Hooks, StepMetrics, Trainer, list_batches
from ddpm.training import TrainingState

# A run that trains in milliseconds on a CPU: an 8-wide U-Net, T = 20, batch 4.
TINY = {
    "model.hidden_size": 8,
    "diffusion.num_timesteps": 20,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 0,
    "train.batch_size": 4,
    "train.ema_decay": 0.9,
    "train.log_every": 1,
    "sample.num": 2,
    "sample.steps": 5,
}


def make_config(changes: Mapping[str, Any] | None = None) -> Config:
    """The tiny run's Config with dotted changes on top, e.g. {"optim.schedule": "cosine"}."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in {**TINY, **(changes or {})}.items():
        group, name = key.split(".")
        groups.setdefault(group, {})[name] = value
    base = Config()
    return dataclasses.replace(
        base, **{g: dataclasses.replace(getattr(base, g), **v) for g, v in groups.items()}
    )


def write_cifar10(root: Path, images_per_batch: int = 8, seed: int = 0) -> Path:
    """Write data_batch_1..5 (+ test_batch, batches.meta) under root/cifar-10-batches-py in the
    official python format: pickled dicts with bytes keys and a uint8 (N, 3072) `data` array."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, images_per_batch).tolist(),
            b"data": rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(images_per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_vis": 3072}, f, protocol=2)
    return folder


def tiny_overrides(folder: Path) -> dict[str, Any]:
    """Overrides for a tiny CPU run on 64 of 80 official-format CIFAR images written under
    folder: hidden 16, T = 50, 2 epochs of 2 steps."""
    write_cifar10(folder / "data", images_per_batch=16)
    return {
        "data.root": str(folder / "data"),
        "data.subset": 64,
        "run.dir": str(folder / "runs"),
        "model.hidden_size": 16,
        "diffusion.num_timesteps": 50,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.device": "cpu",
        "train.log_every": 1,
        "optim.warmup_steps": 2,
        "sample.num": 4,
        "sample.steps": 5,
        "wandb.mode": "disabled",
    }


def smooth_batch(seed: int) -> torch.Tensor:
    """4 image-like 3x32x32 batches in [-1, 1]: random 4x4 colour fields, bicubic-upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=32, mode="bicubic", align_corners=False).clamp(-1, 1)


class Calls(Hooks):
    """Loop hooks that call plain functions: on_step(step, metrics), after_step() and
    stop() -> bool, each optional."""

    def __init__(
        self,
        on_step: Callable[[int, StepMetrics], None] | None = None,
        after_step: Callable[[], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self._on_step, self._after_step, self._stop = on_step, after_step, stop

    def should_stop(self) -> bool:
        return self._stop is not None and self._stop()

    def on_step(self, step: int, metrics: StepMetrics) -> None:
        if self._on_step is not None:
            self._on_step(step, metrics)

    def after_step(self, step: int) -> None:
        if self._after_step is not None:
            self._after_step()


def train_on(
    state: TrainingState, batches: Iterable[torch.Tensor], hooks: Hooks | None = None, **train: Any
) -> EpochResult:
    """One Trainer epoch of `state` on a list of batches (read every step, never failing on
    bad steps unless train.max_bad_steps is given), train.* changes as keywords."""
    train = {"log_every": 1, "max_bad_steps": None, "device": str(state.device), **train}
    config = TrainConfig(**train)
    return Trainer(state, list_batches(list(batches)), config, hooks=hooks).epoch()
