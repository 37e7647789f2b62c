"""The one build configuration the tests share: a tiny CPU run, changed per test.

Importable from any test module (pyproject puts tests/ on the path): `from tiny_run import
make_config`; tests that take fixtures use `tiny_config` (conftest.py) instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

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
