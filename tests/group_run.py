"""A data-parallel training group of real processes for the tests: `train_group` starts ranks
as spawned processes on the CPU (gloo) through the core alone, every rank running the same
Trainer loop (rank 0 shares its start, the others take it in train_rank); `train_alone` is
the same run in one process.

Importable from any test module (pyproject puts tests/ on the path).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

import ddpm.build
from ddpm.batches import TrainingData
from ddpm.build import build_training
from ddpm.config import Config
from ddpm.datasets import load_dataset, locate_dataset
from ddpm.distributed import join
from ddpm.group_training import share_start, train_rank
from ddpm.trainer import Trainer, TrainingDiverged
from ddpm.unet import UNet
from flows.children import free_port


def train_alone(config: Config) -> dict[str, Any]:
    """The final snapshot of config.train.epochs epochs in this process.

    With train.accumulate = k, each batch's gradient is the sum of the k weighted slice
    gradients that k ranks would compute (ddpm.trainer.micro_batches, t and eps drawn once for
    the batch): the same gradient summed in another order, with no second process. The
    distance of that run from the plain one is the spread of summation order on this machine.
    """
    torch.set_num_threads(1)
    data = TrainingData(load_dataset(config, locate_dataset(config.data)), config)
    state = build_training(config, data.steps_per_epoch * config.train.epochs)
    Trainer(state, data, config.train).fit()
    return state.snapshot()


class _NanAfter(UNet):
    """A U-Net whose training calls return NaN after the first `calls` (in one process)."""

    calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, t)
        if self.training:
            _NanAfter.calls -= 1
            if _NanAfter.calls < 0:
                return out * math.nan
        return out


def _rank(
    rank: int, world_size: int, port: int, config: Config, out: str, nan: tuple[int, int] | None
) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )  # fmt: skip
    if nan is not None and nan[0] == rank:
        ddpm.build.UNet, _NanAfter.calls = _NanAfter, nan[1]
    group = join("cpu", timeout=60)
    try:
        if rank:
            with contextlib.suppress(TrainingDiverged):  # rank 0 records it
                train_rank(group, config)
            return
        path = str(locate_dataset(config.data))
        data = TrainingData(load_dataset(config, path), config, rank, world_size)
        state = build_training(config, data.steps_per_epoch * config.train.epochs)
        share_start(group, state, path)
        try:
            Trainer(state, data, config.train, group=group).fit()
        except TrainingDiverged as err:
            state.settings["diverged"] = str(err)
        torch.save(state.snapshot(), out)
    finally:
        group.leave()


def train_group(
    config: Config, world_size: int, out: Path, nan: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Rank 0's final snapshot of the same run trained by world_size spawned processes, each
    running the same loop (SPMD); each must exit 0. nan = (rank, calls): that rank's U-Net
    returns NaN after `calls` training calls; rank 0 then records the divergence in the
    snapshot's settings."""
    mp.spawn(_rank, (world_size, free_port(), config, str(out), nan), nprocs=world_size)
    return torch.load(out, weights_only=False)
