"""The one build configuration the tests share: a tiny CPU run, changed per test, and its data.

Importable from any test module (pyproject puts tests/ on the path): `from tiny_run import
make_config`; tests that take fixtures use `tiny_config` (conftest.py) instead.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddpm.config import Config

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
