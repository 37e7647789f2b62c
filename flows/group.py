"""The process group of a data-parallel run, around train_flow (ddpm.distributed).

With train.devices = k > 1 and no group yet, the process running train_flow becomes rank 0 and
starts ranks 1..k-1 on this machine (`python -m flows.follow`, with the same settings). Under
torchrun the group is torchrun's: rank 0 runs train_flow (`flows/train_flow.py`), every other
rank follows (flows.cli sends them to flows.follow).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ddpm.config import Config
from ddpm.distributed import Group, environment, free_port, join, spawn_followers
from settings import SettingsError

# Rank 0's flags, as JSON, for its followers (not DDPM_*: that prefix is for settings).
FOLLOW_OVERRIDES = "TRAIN_FLOW_OVERRIDES"


def group_size(config: Config) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) of this process's group, None when it trains alone.

    Raises:
        SettingsError: if train.devices asks for more GPUs than this machine has, or differs
            from the size of the group torchrun started.
    """
    env, devices = environment(), config.train.devices
    if env is not None:
        if devices not in (1, env["world_size"]):
            raise SettingsError(
                [("train.devices", f"{devices} differs from torchrun's WORLD_SIZE "
                  f"({env['world_size']}); leave it out under torchrun")]
            )  # fmt: skip
        return env["rank"], env["world_size"], env["local_rank"]
    if devices == 1:
        return None
    on_cuda = torch.device(config.train.device).type == "cuda"
    if on_cuda and torch.cuda.device_count() < devices:
        raise SettingsError(
            [("train.devices", f"{devices} GPUs asked for, {torch.cuda.device_count()} here")]
        )
    return 0, devices, 0


@contextlib.contextmanager
def training_group(config: Config, overrides: dict[str, Any] | None) -> Iterator[Group | None]:
    """This process's group as rank 0 (starting the followers on this machine unless torchrun
    did), or None for a run of one process. On leaving, the followers are told the run is over
    (and killed if they do not leave within train.rank_timeout, or at once after a failure)."""
    place = group_size(config)
    if place is None:
        yield None
        return
    rank, world_size, local_rank = place
    followers, master = {}, None
    if environment() is None:
        master = ("127.0.0.1", free_port())
        env = {**os.environ, FOLLOW_OVERRIDES: json.dumps(overrides or {}, default=str)}
        command = [sys.executable, "-m", "flows.follow"]
        followers = spawn_followers(world_size, command, env, master[1])
    try:
        group = join(rank, world_size, local_rank, config.train.device,
                     config.train.rank_timeout, followers, master)  # fmt: skip
    except BaseException:
        for process in followers.values():
            process.kill()
        raise
    finished = False
    try:
        yield group
        finished = True
    finally:
        group.end(wait=finished)
