"""The training loop: `Trainer.epoch` and `train_step` are one whole step, read top to bottom.

    batch -> noise -> loss -> backward -> clip -> optimizer -> lr schedule -> EMA
          -> (every train.log_every steps) read the metrics -> (every train.checkpoint_every
          steps) a mid-epoch checkpoint -> the stop check before the next step

The same loop runs in one process and on every rank of a data-parallel group (SPMD,
ddpm.distributed): the group adds only a DDP wrapper, rank 0's stop flag and the global loss.
The ranks other than 0 take rank 0's start and run it in ddpm.group_training.train_rank.
What orchestration adds (logging, progress, stop requests) comes in through `Hooks`.

Nothing here waits for the device between reads: each step's loss, gradient norm and outcome
stay there and are read together every train.log_every steps (one sync per read).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import nn

from ddpm.batches import shard_bounds
from ddpm.checkpoint import CheckpointWriter
from ddpm.config import TrainConfig
from ddpm.distributed import Group, Shard, collectives
from ddpm.run_dir import RunDir, save_ema_snapshot, save_step_checkpoint
from ddpm.training import TrainingState, autocast


class TrainingDiverged(RuntimeError):
    """The loss or the gradient was not finite for more steps in a row than allowed."""


class StepResult(NamedTuple):
    """One training step, as tensors still on the device (reading them waits for it)."""

    loss: torch.Tensor  # () the (global) batch loss
    grad_norm: torch.Tensor  # () gradient norm before clipping
    taken: torch.Tensor  # () bool: the update was applied
    bad: torch.Tensor  # () bool: loss or gradient not finite (fp16 overflows are not bad)
    lr: float  # the lr the step used


class StepMetrics(NamedTuple):
    """One training step, read from the device."""

    loss: float  # the batch loss (NaN or inf for a skipped step)
    lr: float  # the lr the step used
    grad_norm: float  # before clipping
    skipped: bool  # the update was not applied (non-finite loss or gradient)


@dataclass(frozen=True)
class EpochResult:
    """What one call of Trainer.epoch did."""

    epoch: int  # the epoch trained, from 1
    global_step: int  # steps taken by the run after it
    loss: float  # mean loss of the steps with a finite loss
    lr: float  # the lr the last step used
    bad_steps: int  # steps skipped as non-finite
    steps: int  # steps run in this call (fewer than an epoch's after a mid-epoch resume)
    images: int  # images seen (all ranks together)
    images_per_s: float
    seconds: float  # wall time
    stopped: bool = False  # ended early at a stop request; the epoch's other batches are to do


class Hooks:
    """What orchestration adds to the loop; each method does nothing here.

    should_stop is asked before each step (in a group, rank 0's answer counts on every rank);
    on_step gets every step's metrics at the reads, in order; after_step runs right after
    each step is queued, with nothing read (a progress bar).
    """

    def should_stop(self) -> bool:
        return False

    def on_step(self, step: int, metrics: StepMetrics) -> None:
        """step: the run's step number after it (from 1)."""

    def after_step(self, step: int) -> None:
        """step: the run's step number after it (from 1)."""


class Batches(Protocol):
    """What the loop trains on: ddpm.batches.TrainingData, or any object that cuts epochs alike."""

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterable[torch.Tensor]: ...

    def batch_size_at(self, index: int) -> int: ...


class Trainer:
    """Trains a TrainingState on its data, an epoch per call of `epoch`, as one process or
    one rank of a group.

    Args:
        state: model, optimizer, schedule, EMA and counters; moved to train.device.
        data: batches of each epoch (this rank's slices in a group).
        train: device, log_every, max_bad_steps, checkpoint_every, compile, epochs.
        run: where mid-epoch checkpoints go (rank 0; None writes none).
        hooks: logging, progress and stop requests.
        group: train data-parallel with this group (ddpm.distributed).
    """

    def __init__(
        self,
        state: TrainingState,
        data: Batches,
        train: TrainConfig,
        run: RunDir | None = None,
        hooks: Hooks | None = None,
        group: Group | None = None,
    ) -> None:
        self.state, self.data, self.train, self.run = state, data, train, run
        self.hooks, self.group = hooks or Hooks(), group

    def fit(self) -> EpochResult | None:
        """Train epochs until train.epochs are done or a stop request ends one early; returns
        the last epoch's result (None when none was left)."""
        result = None
        while self.state.epoch < self.train.epochs and not (result and result.stopped):
            result = self.epoch()
        return result

    def epoch(self) -> EpochResult:
        """Train the state's next epoch, from batch state.epoch_step on.

        A mid-epoch checkpoint of the state goes to a background writer every
        train.checkpoint_every steps; each write must end by the end of the next step, so a
        crash loses at most checkpoint_every steps. When a stop request ends the epoch early,
        the state after the last step goes to a mid-epoch checkpoint before this returns (and
        stays mid-epoch: `stopped` is set), so a re-run resumes with no step lost or repeated.

        Raises:
            TrainingDiverged: after more than train.max_bad_steps non-finite steps in a row.
            RankFailed: if a rank of the group died or hung.
        """
        state, train, hooks = self.state, self.train, self.hooks
        shard, layout = self._prepare()
        reader = _Reader(state.global_step, hooks, train.max_bad_steps)
        writer = CheckpointWriter() if train.checkpoint_every and self.run else None
        images, stopped, start, state.dirty = 0, False, time.perf_counter(), True
        try:
            with collectives(self.group):
                for x0 in self.data.epoch(state.epoch + 1, start_batch=state.epoch_step):
                    if stopped := self._stop_agreed():  # rank 0's answer, on every rank
                        break
                    n = self.data.batch_size_at(state.epoch_step)
                    x0 = x0.to(state.device, memory_format=layout, non_blocking=True)
                    reader.queue(train_step(state, x0, shard, n, train.accumulate))
                    state.global_step, state.epoch_step, images = (
                        state.global_step + 1, state.epoch_step + 1, images + n,
                    )  # fmt: skip
                    self._checkpoint(writer)  # every train.checkpoint_every steps
                    self._ema_snapshot()  # every state.ema_snapshot_every steps
                    hooks.after_step(state.global_step)
                    if len(reader.pending) >= train.log_every:
                        reader.read()
                reader.read()
        finally:
            if writer is not None:
                writer.close()
        return self._end_epoch(reader, images, time.perf_counter() - start, stopped)

    def _prepare(self) -> tuple[Shard | None, torch.memory_format]:
        """Move the state to train.device and put the network in the layout it trains in: on
        CUDA, uncompiled, channels-last (so the batches are too); compiled (train.compile,
        once, in place: state dicts are unchanged), contiguous, inductor picking the layouts
        (channels-last parameters make its backward fail, pytorch/pytorch#171622)."""
        state, train = self.state, self.train
        state.to(train.device)
        state.diffusion.train()
        layout = torch.contiguous_format
        if state.device.type == "cuda" and not train.compile:
            layout = torch.channels_last
            state.diffusion.to(memory_format=layout)
        if train.compile and not state.compiled:
            state.diffusion.eps_model.compile()
            state.compiled = True
        return (self.group.shard(state.diffusion) if self.group else None), layout

    def _stop_agreed(self) -> bool:
        wanted = self.hooks.should_stop()
        return self.group.agree(wanted) if self.group else wanted

    def _checkpoint(self, writer: CheckpointWriter | None) -> None:
        """Wait for the previous write (it overlapped this step); every checkpoint_every
        steps, hand the writer a snapshot to save as a mid-epoch checkpoint."""
        if writer is None:
            return
        writer.wait()
        if self.state.global_step % self.train.checkpoint_every == 0:
            snapshot, run = self.state.snapshot(), self.run
            writer.submit(lambda: save_step_checkpoint(snapshot, run))

    def _ema_snapshot(self) -> None:
        """Every ema_snapshot_every steps, save the power-function EMAs to the run's ema/
        folder (post-hoc EMA; a resumed run writes the ones it repeats again)."""
        state = self.state
        every = state.ema_snapshot_every
        if self.run is None or not state.profiles or not every or state.global_step % every:
            return
        save_ema_snapshot(state.profiles, self.run, state.global_step)

    def _end_epoch(
        self, reader: _Reader, images: int, seconds: float, stopped: bool
    ) -> EpochResult:
        state = self.state
        result = EpochResult(
            epoch=state.epoch + 1,
            global_step=state.global_step,
            loss=reader.loss_sum / max(reader.steps - reader.bad, 1),
            lr=reader.lr if reader.steps else state.optimizer.param_groups[0]["lr"],
            bad_steps=reader.bad,
            steps=reader.steps,
            images=images,
            images_per_s=images / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            stopped=stopped,
        )
        if not stopped:
            state.epoch, state.epoch_step, state.dirty = result.epoch, 0, False
        elif self.run is not None or not reader.steps:
            if reader.steps:  # else the state is still the newest checkpoint's
                save_step_checkpoint(state.snapshot(), self.run)
            state.dirty = False
        return result


def train_step(
    state: TrainingState,
    x0: torch.Tensor,
    shard: Shard | None = None,
    n: int = 0,
    parts: int = 1,
) -> StepResult:
    """One optimizer step on a batch, skipped when the loss or the gradient is not finite.

    The forward runs under autocast for bf16/fp16; fp16 needs the state's scaler, which also
    skips (and lowers its scale) when the scaled gradient overflows. A skipped step changes no
    weight, optimizer moment or EMA; the lr schedule advances with every batch, taken or not.

    Args:
        state: the model (on x0's device), optimizer, and the optional scheduler, EMA,
            gradient clipping, precision and fp16 scaler; its counters are the caller's.
        x0: (B, C, H, W) clean images in [-1, 1]: the batch, or with a shard this rank's
            slice of the global batch of n images.
        shard, n: data-parallel: t and eps are drawn for all n images on every rank alike,
            the rank trains its slice, and the loss reported (and checked) is the global one,
            so every rank takes or skips the step alike.
        parts: gradient accumulation: the (slice of the) batch runs forward and backward in
            this many micro-batches, the gradients adding up to the whole batch's (a group
            all-reduces only after the last).
    """
    diffusion, optimizer, scaler = state.diffusion, state.optimizer, state.scaler
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    # DDPM Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), drawn for the whole global batch of n.
    noise = diffusion.draw_training_noise(x0.new_empty((n or len(x0), *x0.shape[1:])))
    model, pieces = (shard.model if shard else diffusion), micro_batches(x0, noise, shard, parts)
    loss = torch.zeros((), device=x0.device)
    for i, (x, noise_i, weight) in enumerate(pieces):
        alone = shard is None or i == len(pieces) - 1  # else DDP skips the all-reduce
        with contextlib.nullcontext() if alone else shard.model.no_sync():
            with autocast(x0.device.type, state.precision):
                part = model(x, *noise_i) * weight  # the weighted mean loss, L_simple
            (scaler.scale(part) if scaler is not None else part).backward()
        loss = loss + part.detach().float()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(
        diffusion.parameters(), state.grad_clip if state.grad_clip > 0 else math.inf
    )
    loss = loss if shard is None else shard.mean(loss)
    taken, bad = _update(state, loss, grad_norm)
    if state.scheduler is not None:
        state.scheduler.step()
    if state.ema is not None:
        state.ema.update_parameters(diffusion, taken)
    for profile in state.profiles.values():
        profile.update_parameters(diffusion, taken)
    return StepResult(loss, grad_norm, taken, bad, lr)


def micro_batches(
    x0: torch.Tensor, noise: tuple[torch.Tensor, ...], shard: Shard | None, parts: int
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...], float]]:
    """This rank's slice of the global batch (all of it in one process) in `parts` pieces of
    torch.chunk's sizes, each (x0, noise, weight) with the weight size * k / n that makes
    the sum of the pieces' mean losses, averaged over the k ranks by DDP, the mean loss of
    the global batch of n. An empty slice gives one blank piece of weight 0, so the rank
    still joins the gradient all-reduce.

    Args:
        x0: (m, C, H, W) this rank's slice.
        noise: the global batch's per-image draws (DiffusionModel.draw_training_noise: t (n,),
            eps (n, C, H, W) and, with augmentation labels, the flips (n,)).
    """
    n, k = len(noise[0]), shard.world_size if shard else 1
    lo, hi = shard_bounds(n, shard.rank, k) if shard else (0, n)
    if hi == lo:
        return [(x0.new_zeros((1, *x0.shape[1:])), tuple(v[:1] for v in noise), 0.0)]
    size = -(-(hi - lo) // parts)
    starts = range(lo, hi, size)
    return [
        (x0[a - lo : b - lo], tuple(v[a:b] for v in noise), (b - a) * k / n)
        for a, b in zip(starts, [*starts[1:], hi], strict=True)
    ]


def _update(
    state: TrainingState, loss: torch.Tensor, grad_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step the optimizer unless the loss or the gradient is not finite; returns (taken, bad)
    as device flags.

    With fp16 the scaler finds the same non-finite gradients, skips, and lowers its scale: a
    finite loss with overflowing fp16 gradients is its business, not divergence (not bad).
    A fused optimizer skips on a device-side flag (`found_inf`, GradScaler's mechanism), so
    nothing here waits for the device; others (the CPU default, where waiting costs nothing)
    are checked on the host.
    """
    optimizer, scaler = state.optimizer, state.scaler
    loss_finite = torch.isfinite(loss)
    taken = loss_finite & torch.isfinite(grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
        return taken, ~loss_finite
    fused = bool(optimizer.param_groups[0].get("fused"))
    if fused and getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf, optimizer.grad_scale = (~taken).float(), None
        try:
            optimizer.step()
        finally:
            optimizer.found_inf = None
    elif taken:
        optimizer.step()
    return taken, ~taken


class _Reader:
    """Reads queued steps' results from the device in one go, checks for divergence, and
    hands each step's metrics to the hooks; keeps the epoch's totals."""

    def __init__(self, first_step: int, hooks: Hooks, max_bad: int | None) -> None:
        self.next_step, self.hooks, self.max_bad = first_step + 1, hooks, max_bad
        self.pending: list[tuple[torch.Tensor, float]] = []  # (stats (4,), lr) per step
        self.loss_sum, self.steps, self.bad, self.bad_in_a_row, self.lr = 0.0, 0, 0, 0, 0.0

    def queue(self, step: StepResult) -> None:
        stats = torch.stack([step.loss.float(), step.grad_norm.float(), step.taken, step.bad])
        self.pending.append((stats, step.lr))

    def read(self) -> None:
        if not self.pending:
            return
        values = torch.stack([stats for stats, _ in self.pending]).tolist()  # waits
        for (loss, grad_norm, taken, bad), (_, lr) in zip(values, self.pending, strict=True):
            self.steps, self.lr = self.steps + 1, lr
            if bad:
                self.bad, self.bad_in_a_row = self.bad + 1, self.bad_in_a_row + 1
                if self.max_bad is not None and self.bad_in_a_row > self.max_bad:
                    raise TrainingDiverged(
                        f"loss or gradient not finite for {self.bad_in_a_row} steps in a row "
                        f"(more than train.max_bad_steps = {self.max_bad}); last loss "
                        f"{loss}, gradient norm {grad_norm}"
                    )
            else:
                self.loss_sum += loss  # overflowed fp16 steps had a finite loss
                self.bad_in_a_row = 0
            self.hooks.on_step(self.next_step, StepMetrics(loss, lr, grad_norm, not taken))
            self.next_step += 1
        self.pending.clear()


def list_batches(batches: list[torch.Tensor]) -> Batches:
    """Batches for a Trainer from a list: every epoch is the whole list (tests, notebooks)."""
    return _ListBatches(batches)


class _ListBatches:
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        return iter(self.batches[start_batch:])

    def batch_size_at(self, index: int) -> int:
        return self.batches[index].shape[0]
