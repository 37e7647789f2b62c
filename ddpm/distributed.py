"""Data-parallel training over torch.distributed: one process per device, rank 0 leading.

Rank 0 runs the run: it builds or resumes the state, trains, and alone writes checkpoints,
grids and tracking. Every other rank `follow`s it: before each epoch rank 0 sends a command
through the group's store (the epoch, where it starts, the RNG state, and the whole training
state after a start, a resume or a failed epoch), and the ranks train that epoch together.

Equivalence with one process: every rank walks the same global batches (size, order and flips
of a one-process run) and keeps its slice; t and eps are drawn for the global batch from the
same generator state and sliced alike; each rank's loss is weighted by its share of the batch,
so DDP's gradient average is the global batch's mean gradient. A k-process run therefore
reproduces the one-process run up to the rounding of the all-reduce.

Failure: every collective waits at most `timeout` seconds; a rank that dies breaks the next
collective at once. Either way the run fails with RankFailed, naming the rank where it can
(local followers are watched as processes; under torchrun its agent names a failed worker).
Between epochs followers watch a heartbeat of rank 0, and leave when it stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddpm.config import Config
from ddpm.errors import first_line

HEARTBEAT_S = 1.0  # rank 0 beats this often
POLL_S = 0.02  # followers look for rank 0's next command this often


class RankFailed(RuntimeError):
    """A rank died, hung, or lost rank 0: the group cannot go on (a retry cannot help)."""


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's slice of a global batch of n, as torch.chunk cuts it: ceil(n / k)
    each, the last ranks shorter (or empty when n < k)."""
    chunk = -(-n // world_size)
    lo = min(rank * chunk, n)
    return lo, min(lo + chunk, n)


@dataclass
class Shard:
    """What a training step needs to take its part of a global batch."""

    rank: int
    world_size: int
    model: nn.Module  # the DiffusionModel inside DistributedDataParallel

    def loss(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """This rank's share of the global batch's L_simple, weighted so that DDP's average
        of the ranks' gradients is the gradient of the global mean.

        Args:
            x0, t, eps: the global batch (N, C, H, W), its timesteps (N,) and noise
                (N, C, H, W), identical on every rank.

        Returns:
            scalar: mean over this rank's slice x (slice size * k / N); an empty slice runs
            the first image with weight 0, so every rank joins the gradient all-reduce.
        """
        n = x0.shape[0]
        lo, hi = shard_bounds(n, self.rank, self.world_size)
        if hi == lo:
            return self.model(x0[:1], t[:1], eps[:1]) * 0.0
        weight = (hi - lo) * self.world_size / n
        return self.model(x0[lo:hi], t[lo:hi], eps[lo:hi]) * weight

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a weighted loss: the global batch's loss, on every rank."""
        dist.all_reduce(value)
        return value / self.world_size


@dataclass
class Group:
    """This process's place in a training group, and the channels the group talks over.

    Args:
        rank, world_size, local_rank: as torchrun sets RANK, WORLD_SIZE and LOCAL_RANK.
        store: the group's key-value store (commands and rank 0's heartbeat).
        timeout: seconds any rank may go silent before the run fails.
        followers: rank -> process, for the followers this process started itself.
    """

    rank: int
    world_size: int
    local_rank: int
    store: dist.Store
    timeout: float
    followers: dict[int, subprocess.Popen] = field(default_factory=dict)
    control: Any = None  # a gloo group: per-step flags and state broadcasts, on the CPU
    in_sync: bool = False  # (rank 0) the followers hold rank 0's state
    data_path: str | None = None  # (rank 0) where the followers find the data
    _sent: int = 0
    _received: int = 0
    _models: dict[int, nn.Module] = field(default_factory=dict)
    _beating: threading.Event | None = None

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
        """This rank's Shard, its DDP wrapper made once per model (the wrapper broadcasts rank
        0's weights when made)."""
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

    # ---- rank 0 ---------------------------------------------------------------------------

    def send(self, command: dict[str, Any]) -> None:
        """(rank 0) Queue a command for every follower."""
        self.store.set(f"command/{self._sent}", pickle.dumps(command))
        self._sent += 1

    def lead_epoch(self, snapshot: Callable[[], dict[str, Any]], epoch: int, start: int) -> None:
        """(rank 0) Tell the followers to train `epoch` from batch `start`, with rank 0's RNG
        state, and with its whole state (from `snapshot`) unless they hold it already."""
        sync = not self.in_sync
        self.send(
            {
                "kind": "epoch",
                "epoch": epoch,
                "start": start,
                "data_path": self.data_path,
                "rng": _training_rng(),
                "sync": sync,
            }
        )
        if sync:
            self.broadcast(snapshot())
            self.in_sync = True

    def end(self, wait: bool = True) -> None:
        """(rank 0) Tell the followers the run is over and leave the group. With `wait`, give
        the followers this process started `timeout` seconds to leave; without (after a
        failure), a moment. Any still there then are killed."""
        with contextlib.suppress(Exception):  # a store whose peers are gone
            self.send({"kind": "end"})
        deadline = time.monotonic() + (self.timeout if wait else 2.0)
        for process in self.followers.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.close()

    def failure(self, err: BaseException) -> RankFailed:
        """(rank 0) The RankFailed for a collective that failed: names the followers that died
        (waiting briefly for a dying one to be reaped)."""
        deadline = time.monotonic() + 2.0
        while True:
            dead = _exited(self.followers)
            if dead or not self.followers or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if dead:
            return RankFailed(f"{'; '.join(dead)}: the run cannot go on without it")
        who = "a rank"
        if self.world_size == 2:  # rank 0's only peer
            process = self.followers.get(1)
            who = f"rank 1 (pid {process.pid})" if process else "rank 1"
        return RankFailed(
            f"{who} stopped answering for train.rank_timeout ({self.timeout:g} s): "
            f"{first_line(err)}"
        )

    # ---- followers ------------------------------------------------------------------------

    def receive(self) -> dict[str, Any]:
        """(follower) The next command of rank 0; waits while rank 0's heartbeat goes on.

        Raises:
            RankFailed: if rank 0 is gone (its store closed) or silent for `timeout` seconds.
        """
        key = f"command/{self._received}"
        beat, seen = self._beat(), time.monotonic()
        while not self._has(key):
            time.sleep(POLL_S)
            now_beat = self._beat()
            if now_beat != beat:
                beat, seen = now_beat, time.monotonic()
            elif time.monotonic() - seen > self.timeout:
                raise RankFailed(
                    f"rank 0 silent for {self.timeout:g} s (train.rank_timeout) between epochs"
                )
        self._received += 1
        return pickle.loads(self.store.get(key))

    def _beat(self) -> int:
        try:
            return self.store.add("heartbeat", 0)
        except Exception as err:  # rank 0, which holds the store, is gone
            raise RankFailed(f"lost rank 0 ({first_line(err)})") from err

    def _has(self, key: str) -> bool:
        try:
            return self.store.check([key])
        except Exception as err:
            raise RankFailed(f"lost rank 0 ({first_line(err)})") from err

    # ---- every rank -----------------------------------------------------------------------

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag, on every rank (a per-step CPU broadcast: no wait for the GPU)."""
        value = torch.tensor([int(flag)])
        dist.broadcast(value, src=0, group=self.control)
        return bool(value.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object (a state snapshot), on every rank."""
        holder = [obj]
        dist.broadcast_object_list(holder, src=0, group=self.control)
        return holder[0]

    def start_heartbeat(self) -> None:
        """(rank 0) Beat every HEARTBEAT_S seconds, from a thread, until close()."""
        stopped = self._beating = threading.Event()

        def beat() -> None:
            while not stopped.wait(HEARTBEAT_S):
                with contextlib.suppress(Exception):
                    self.store.add("heartbeat", 1)

        threading.Thread(target=beat, name="ddpm-heartbeat", daemon=True).start()

    def close(self) -> None:
        """Stop the heartbeat and leave the process group."""
        if self._beating is not None:
            self._beating.set()
        self._models.clear()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _training_rng() -> dict[str, Any]:
    """The generators training draws t and eps from: the CPU's, and the current CUDA device's
    (each rank's own device, so a follower sets its device's generator from rank 0's)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_training_rng(state: dict[str, Any]) -> None:
    """Put rank 0's training generators (from _training_rng) in place on this rank."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _exited(followers: dict[int, subprocess.Popen]) -> list[str]:
    """'rank N (pid P) was killed by SIGKILL' (or 'exited with status S') for each follower
    process that has ended."""
    dead = []
    for rank, process in followers.items():
        code = process.poll()
        if code is None:
            continue
        if code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        dead.append(f"rank {rank} (pid {process.pid}) {how}")
    return dead


def environment() -> dict[str, int] | None:
    """RANK, WORLD_SIZE and LOCAL_RANK when this process was started as part of a group (by
    torchrun or by `spawn_followers`), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    return {"rank": rank, "world_size": world, "local_rank": local}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_followers(
    world_size: int, command: Sequence[str], env: dict[str, str], port: int
) -> dict[int, subprocess.Popen]:
    """Start ranks 1..world_size-1 on this machine, each `command` in its own session (so a
    terminal's Ctrl-C reaches rank 0 alone, which stops the group), with the group's
    variables added to `env`."""
    followers = {}
    for rank in range(1, world_size):
        ranked = {
            **env,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        followers[rank] = subprocess.Popen(list(command), env=ranked, start_new_session=True)
    return followers


def join(
    rank: int,
    world_size: int,
    local_rank: int,
    device: str,
    timeout: float,
    followers: dict[int, subprocess.Popen] | None = None,
    master: tuple[str, int] | None = None,
) -> Group:
    """Join the process group at `master` (address, port), by default MASTER_ADDR:MASTER_PORT
    (gloo on the CPU, NCCL on CUDA).

    Rank 0 hosts the store unless torchrun's agent does (TORCHELASTIC_USE_AGENT_STORE).

    Raises:
        RankFailed: if the group does not gather within `timeout` seconds.
    """
    address, port = master or (
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        int(os.environ["MASTER_PORT"]),
    )
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    wait = timedelta(seconds=timeout)
    try:
        store = dist.TCPStore(
            address, port, world_size, is_master=rank == 0 and not agent_store, timeout=wait,
            wait_for_workers=False,
        )  # fmt: skip
        if followers:
            _await_followers(store, world_size, followers, timeout)
        elif rank:
            store.add("ddpm/joined", 1)
        on_cuda = torch.device(device).type == "cuda"
        if on_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            "nccl" if on_cuda else "gloo",
            store=dist.PrefixStore("pg", store),
            rank=rank,
            world_size=world_size,
            timeout=wait,
        )
        control = dist.new_group(backend="gloo", timeout=wait) if on_cuda else None
    except RankFailed:
        raise
    except Exception as err:
        raise RankFailed(
            f"rank {rank}: the {world_size} ranks did not gather at {address}:{port} within "
            f"train.rank_timeout ({timeout:g} s): {first_line(err)}"
        ) from err
    group = Group(
        rank, world_size, local_rank, dist.PrefixStore("ddpm", store), timeout,
        followers=followers or {}, control=control,
    )  # fmt: skip
    if group.leader:
        group.start_heartbeat()
    return group


def _await_followers(
    store: dist.Store, world_size: int, followers: dict[int, subprocess.Popen], timeout: float
) -> None:
    """(rank 0) Wait until every follower has reached the store; fail at once, naming it, if
    one of the processes this rank started exits first."""
    deadline = time.monotonic() + timeout
    while store.add("ddpm/joined", 0) < world_size - 1:
        dead = _exited(followers)
        if dead:
            raise RankFailed(f"{dead[0]} before joining the group (its error is above)")
        if time.monotonic() > deadline:
            raise RankFailed(
                f"the {world_size} ranks did not gather within train.rank_timeout ({timeout:g} s)"
            )
        time.sleep(0.1)


@contextlib.contextmanager
def collectives(group: Group) -> Iterator[None]:
    """Turn a failed collective into RankFailed (naming the dead rank on rank 0). A failure
    that is not the group's (divergence, a bug) passes as it is."""
    try:
        yield
    except RankFailed:
        raise
    except (dist.DistError, RuntimeError) as err:
        if not _is_collective_error(err):
            raise
        if group.leader:
            raise group.failure(err) from err
        raise RankFailed(f"rank {group.rank}: lost the group ({first_line(err)})") from err


def _is_collective_error(err: BaseException) -> bool:
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return any(
        mark in text
        for mark in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out")
    )
