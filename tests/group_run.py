"""A data-parallel training group of real processes for the tests: `train_group` starts ranks
as spawned processes on the CPU (gloo) through the core alone, rank 0 training with
run_epoch(group=...) and the others in `follow`; `train_alone` is the same run in one process.

Importable from any test module (pyproject puts tests/ on the path).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

import ddpm.run
from ddpm.config import Config
from ddpm.data import TrainingData, load_dataset, locate_dataset
from ddpm.distributed import Shard, free_port, join
from ddpm.run import build_training, follow, run_epoch
from ddpm.training import TrainingDiverged
from ddpm.unet import UNet


def train_alone(config: Config, parts: int = 1) -> dict[str, Any]:
    """The final snapshot of config.train.epochs epochs in this process.

    With parts k > 1, each batch's loss is the mean of the k weighted slice losses that k
    ranks would compute (ddpm.distributed.Shard.loss, t and eps drawn once for the batch):
    the same gradient summed in another order, with no second process. The distance of
    that run from the plain one is the spread of summation order on this machine.
    """
    torch.set_num_threads(1)
    data = TrainingData(load_dataset(config, locate_dataset(config.data)), config)
    state = build_training(config, data.steps_per_epoch * config.train.epochs)
    if parts > 1:
        diffusion, whole = state.diffusion, state.diffusion.forward

        def in_parts(x0: torch.Tensor) -> torch.Tensor:
            t, eps = diffusion.draw_training_noise(x0)
            shards = [Shard(r, parts, whole) for r in range(parts)]  # type: ignore[arg-type]
            return sum(shard.loss(x0, t, eps) for shard in shards) / parts

        diffusion.forward = in_parts  # type: ignore[method-assign]
    while state.epoch < config.train.epochs:
        run_epoch(state, data, config.train)
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
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if nan is not None and nan[0] == rank:
        ddpm.run.UNet, _NanAfter.calls = _NanAfter, nan[1]
    group = join(rank, world_size, rank, "cpu", timeout=60)
    try:
        if rank:
            follow(group, config)
            return
        path = str(locate_dataset(config.data))
        group.data_path = path
        data = TrainingData(load_dataset(config, path), config)
        state = build_training(config, data.steps_per_epoch * config.train.epochs)
        try:
            while state.epoch < config.train.epochs:
                run_epoch(state, data, config.train, group=group)
        except TrainingDiverged as err:
            state.settings["diverged"] = str(err)
        group.end()
        torch.save(state.snapshot(), out)
    finally:
        group.close()


def train_group(
    config: Config, world_size: int, out: Path, nan: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Rank 0's final snapshot of the same run trained by world_size spawned processes (each
    of which must exit 0). nan = (rank, calls): that rank's U-Net returns NaN after `calls`
    training calls; rank 0 then records the divergence in the snapshot's settings."""
    mp.spawn(_rank, (world_size, free_port(), config, str(out), nan), nprocs=world_size)
    return torch.load(out, weights_only=False)
