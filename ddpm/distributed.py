"""Data-parallel training as one program on every rank (SPMD), as torchrun runs it.

Every rank runs the same training loop (ddpm.trainer) from the same settings, and the ranks
meet only in collectives: rank 0's state, broadcast once when the ranks start; DDP's gradient
all-reduce and the global loss every step; and rank 0's stop flag before every step. Launching
the processes, watching them and restarting the group after a failure is torch's elastic
launcher's job (flows.launch, or torchrun across machines), not this module's.

Equivalence with one process: every rank walks the global batches of a one-process run (same
size, order and flips) and reads only its slice of each; t and eps are drawn for the global
batch from the same generator state and sliced alike; each rank's loss is weighted by its
share of the batch, so DDP's gradient average is the global batch's mean gradient. A
k-process run therefore reproduces the one-process run up to the rounding of the all-reduce.

Failure: a rank that dies breaks the next collective at once; a rank that hangs fails the
others' next collective after `train.rank_timeout`. Either way the process fails with
RankFailed and the launcher restarts the group (or, when no restarts are left, fails the run
naming the rank). Between epochs the other ranks wait for rank 0 (its grid, its evaluation)
in the stop-flag broadcast, which has no practical deadline (BETWEEN_EPOCHS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddpm.config import Config
from ddpm.errors import first_line

# Rank 0 may sample grids and evaluate FID between epochs (minutes to hours) while the other
# ranks wait for its next stop flag.
BETWEEN_EPOCHS = timedelta(days=7)


class RankFailed(RuntimeError):
    """A rank died, hung, or lost the group: this process cannot go on (the launcher restarts
    the group, or fails the run when its restarts are spent)."""


@dataclass
class Shard:
    """What a training step needs to take its part of a global batch."""

    rank: int
    world_size: int
    model: nn.Module  # the DiffusionModel, inside DistributedDataParallel (its slices: trainer)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a weighted loss: the global batch's loss, on every rank."""
        dist.all_reduce(value)
        return value / self.world_size


@dataclass
class Group:
    """This process's place in the group torchrun (or flows.launch) started.

    Args:
        rank, world_size, local_rank: as the launcher set RANK, WORLD_SIZE and LOCAL_RANK.
        control: a gloo group on the CPU for the stop flag and the start broadcast.
    """

    rank: int
    world_size: int
    local_rank: int
    control: Any = None
    _models: dict[int, nn.Module] = field(default_factory=dict)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def place(self, config: Config) -> Config:
        """config with this rank's training device: cuda:LOCAL_RANK for cuda, else as is."""
        device = config.train.device
        if torch.device(device).type == "cuda":
            device = f"cuda:{self.local_rank}"
        return dataclasses.replace(config, train=dataclasses.replace(config.train, device=device))

    def shard(self, diffusion: nn.Module) -> Shard:
        """This rank's Shard, its DDP wrapper made once per model (making it broadcasts rank
        0's weights)."""
        model = self._models.get(id(diffusion))
        if model is None:
            device = next(diffusion.parameters()).device
            with warnings.catch_warnings():  # torch 2.11 renames it, without the same meaning
                warnings.simplefilter("ignore", FutureWarning)
                model = DistributedDataParallel(
                    diffusion,
                    device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False,  # the schedule's buffers are constants
                )
            self._models = {id(diffusion): model}
        return Shard(self.rank, self.world_size, model)

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag, on every rank (a CPU broadcast: no wait for the GPU)."""
        value = torch.tensor([int(flag)])
        dist.broadcast(value, src=0, group=self.control)
        return bool(value.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object (its training state when the ranks start), on every rank."""
        holder = [obj]
        dist.broadcast_object_list(holder, src=0, group=self.control)
        return holder[0]

    def leave(self) -> None:
        """Leave the process group."""
        self._models.clear()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def environment() -> dict[str, int] | None:
    """RANK, WORLD_SIZE and LOCAL_RANK when a launcher started this process as one rank of a
    group, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return {"rank": rank, "world_size": world, "local_rank": int(os.environ.get("LOCAL_RANK", 0))}


def join(device: str, timeout: float) -> Group:
    """Join the group the launcher set up in the environment (MASTER_ADDR, MASTER_PORT, RANK,
    WORLD_SIZE): NCCL on CUDA, gloo on the CPU; collectives fail after `timeout` seconds.

    The launcher's store outlives a restart of the group, so each start of the group keeps
    its keys apart (TORCHELASTIC_RESTART_COUNT): a restarted rank must not find the addresses
    of the ranks that died.

    Raises:
        RankFailed: if the ranks do not gather within `timeout` seconds.
    """
    env = environment()
    if env is None:
        raise RankFailed("RANK and WORLD_SIZE are not set: no launcher started this process")
    rank, world_size, wait = env["rank"], env["world_size"], timedelta(seconds=timeout)
    on_cuda = torch.device(device).type == "cuda"
    try:
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts
        store = dist.TCPStore(
            os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
            world_size, is_master=rank == 0 and not agent, timeout=wait, wait_for_workers=False,
        )  # fmt: skip
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if on_cuda:
            torch.cuda.set_device(env["local_rank"])
        dist.init_process_group(
            "nccl" if on_cuda else "gloo", store=dist.PrefixStore(f"ddpm/{attempt}", store),
            rank=rank, world_size=world_size, timeout=wait,
        )  # fmt: skip
        control = dist.new_group(backend="gloo", timeout=BETWEEN_EPOCHS)
    except Exception as err:
        raise RankFailed(
            f"rank {rank}: the {world_size} ranks did not gather within train.rank_timeout "
            f"({timeout:g} s): {first_line(err)}"
        ) from err
    return Group(rank, world_size, env["local_rank"], control)


@contextlib.contextmanager
def collectives(group: Group | None) -> Iterator[None]:
    """Turn a failed collective into RankFailed; any other failure passes as it is."""
    try:
        yield
    except RankFailed:
        raise
    except (dist.DistError, RuntimeError) as err:
        text = str(err)
        marks = ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out")
        if group is None or not (isinstance(err, dist.DistError) or any(m in text for m in marks)):
            raise
        raise RankFailed(f"rank {group.rank}: lost the group ({first_line(err)})") from err
