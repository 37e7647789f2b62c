"""Training as a data-parallel group (ddpm.distributed): rank 0 shares what it starts from
(share_start), and every other rank takes it and runs the same epochs as rank 0 (train_rank).

The loop itself is ddpm.trainer's, the same on every rank; this module is how the ranks other
than 0 come to run it with rank 0's data, state and RNGs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ddpm.batches import TrainingData
from ddpm.build import build_training
from ddpm.config import Config
from ddpm.datasets import load_dataset, locate_dataset
from ddpm.distributed import Group, collectives
from ddpm.prepare import prepare_folder, reading_prepared
from ddpm.trainer import EpochResult, Trainer
from ddpm.training import TrainingState


def share_start(
    group: Group, state: TrainingState, data_path: str, dataset: str | None = None
) -> None:
    """(rank 0) Send the other ranks what they start from: where the data is (and, when rank 0
    prepared an image folder, that it reads it as dataset "prepared"), and the state built or
    resumed here (EMA aside: it is rank 0's alone), RNGs included."""
    start = {"data_path": data_path, "dataset": dataset,
             "state": {**state.snapshot(), "ema": None, "ema_profiles": None}}  # fmt: skip
    if state.device.type == "cuda":  # training draws on each rank's own device
        start["device_rng"] = torch.cuda.get_rng_state(state.device)
    group.broadcast(start)


def train_rank(group: Group, config: Config) -> EpochResult | None:
    """Train as rank > 0 of a data-parallel group (ddpm.distributed): take rank 0's start
    (share_start), load this rank's slices of the data (from rank 0's path, or fetched here
    when this machine does not have it), then run the same epochs as rank 0, until they are
    done or rank 0 stops the run. No files, no tracking: those are rank 0's.

    Raises:
        RankFailed: if another rank is gone.
        TrainingDiverged: as on rank 0, at the same step (the loss is the global one).
    """
    config = group.place(config)
    with collectives(group):
        start = group.broadcast(None)
    path = Path(start["data_path"])
    if start.get("dataset") == "prepared" and config.data.dataset == "folder":
        if not path.exists():  # rank 0 prepared the folder on its machine: prepare it here
            path = prepare_folder(locate_dataset(config.data), config.data.root / "prepared",
                                  config.data.image_size, config.model.channels)  # fmt: skip
        config = reading_prepared(config, path)
    elif not path.exists():
        path = locate_dataset(config.data)
    data = TrainingData(load_dataset(config, path), config, group.rank, group.world_size)
    # rank 0's sigma_data (measured there, or set): the model is built to load its state
    recorded = start["state"]["architecture"]["diffusion"].get("sigma_data")
    config = dataclasses.replace(
        config, diffusion=dataclasses.replace(config.diffusion, sigma_data=recorded)
    )
    state = build_training(config, data.steps_per_epoch * config.train.epochs)
    state.ema, state.profiles = None, {}  # rank 0's alone
    state.restore(start["state"])
    if "device_rng" in start:
        torch.cuda.set_rng_state(start["device_rng"], torch.device(config.train.device))
    try:
        return Trainer(state, data, config.train, group=group).fit()
    finally:
        data.close()
