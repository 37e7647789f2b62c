"""Optimizers, learning-rate schedules, EMA, the training state, and its step and epoch."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

from ddpm.checkpoint import (
    capture_rng_state,
    check_compatible,
    package_versions,
    restore_rng_state,
    to_cpu,
)
from ddpm.config import Precision
from ddpm.diffusion import DiffusionModel
from ddpm.distributed import Shard


class TrainingDiverged(RuntimeError):
    """The loss or the gradient was not finite for more steps in a row than allowed."""


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, precision: Precision) -> contextlib.AbstractContextManager:
    """Autocast to bf16 or fp16 on device_type for those precisions; nothing for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def resolve_precision(name: str, device: torch.device) -> Precision:
    """'auto' -> bf16 on CUDA (tensor cores, no scaler needed), fp32 elsewhere."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {name!r}; expected auto, fp32, bf16 or fp16")
    return name  # type: ignore[return-value]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's and torch's generators (CPU and every CUDA device).

    Args:
        seed: the seed.
        deterministic: also ask torch for deterministic kernels (slower on GPU).
    """
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; 'cpu', 'cuda', 'cuda:N' as given.

    Raises:
        ValueError: if CUDA is asked for and not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def build_optimizer(
    params: Iterable[nn.Parameter],
    name: Literal["adam", "adamw", "sgd"] = "adam",
    lr: float = 2e-4,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    fused: bool = False,
) -> Optimizer:
    """An optimizer by name.

    Args:
        params: parameters to optimize.
        name: adam, adamw or sgd.
        lr: learning rate.
        momentum: SGD momentum, or beta1 of Adam/AdamW (beta2 stays 0.999).
        weight_decay: L2 penalty (Adam, SGD) or decoupled decay (AdamW).
        fused: one fused kernel per step for all parameters (fast on CUDA).
    """
    common = {"lr": lr, "weight_decay": weight_decay, "fused": fused or None}
    if name == "adam":
        return torch.optim.Adam(params, betas=(momentum, 0.999), **common)
    if name == "adamw":
        return torch.optim.AdamW(params, betas=(momentum, 0.999), **common)
    if name == "sgd":
        return torch.optim.SGD(params, momentum=momentum, **common)
    raise ValueError(f"unknown optimizer {name!r}; expected adam, adamw or sgd")


def lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    schedule: Literal["constant", "cosine"] = "constant",
) -> float:
    """Multiplier of the peak lr at a step: linear warm-up, then constant or cosine to 0.

    Args:
        step: optimizer steps taken so far (0 before the first).
        warmup_steps: steps of linear warm-up (0 = none).
        total_steps: steps of the whole run (the cosine reaches 0 there).
        schedule: what follows the warm-up.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; expected constant or cosine")


class LRSchedule:
    """lr_factor with its settings bound: the lr_lambda of build_lr_scheduler.

    A callable object, not a closure, so LambdaLR saves its settings in the scheduler's state
    dict and puts them back on load: a resumed run keeps the schedule it started with.
    """

    def __init__(
        self, warmup_steps: int, total_steps: int, schedule: Literal["constant", "cosine"]
    ) -> None:
        lr_factor(0, warmup_steps, total_steps, schedule)  # fail now on an unknown schedule
        self.warmup_steps, self.total_steps, self.schedule = warmup_steps, total_steps, schedule

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, self.schedule)


def build_lr_scheduler(
    optimizer: Optimizer,
    warmup_steps: int = 0,
    total_steps: int = 1,
    schedule: Literal["constant", "cosine"] = "constant",
) -> LambdaLR:
    """A per-step LambdaLR following `lr_factor`; call `.step()` after each optimizer step."""
    return LambdaLR(optimizer, LRSchedule(warmup_steps, total_steps, schedule))


MAX_WARMUP_FRACTION = 0.1  # a warm-up longer than this share of a run is shortened to it


def run_warmup_steps(warmup_steps: int, total_steps: int) -> int:
    """The warm-up a run of total_steps gets: warmup_steps, but at most a tenth of the run.

    The DDPM paper's 5,000 steps suit its 800,000-step CIFAR-10 run; a 900-step run on a small
    image folder would otherwise end still warming up, its lr never near the peak.
    """
    return min(warmup_steps, int(total_steps * MAX_WARMUP_FRACTION))


class EMA(AveragedModel):
    """An exponential moving average of a model's weights and buffers, updated on the device,
    with a warm-up of its decay.

    torch.optim.swa_utils.AveragedModel with its state dict (`module.*`, `n_averaged`), so
    checkpoints are unchanged, but its update never waits for the device: AveragedModel reads
    `n_averaged` on the host twice per update, a GPU sync every training step.

    The decay after n updates is min(decay, (1 + n) / (10 + n)), the warm-up of TensorFlow's
    ExponentialMovingAverage (`num_updates`) and diffusers' EMAModel: with the DDPM paper's
    0.9999 from the first step, the average would stay near the random initial weights for
    about 10,000 steps, and every sample grid drawn from it would be noise. With the warm-up,
    after n updates the average spans roughly the last n / 9 of them; the full decay applies
    from n = (10 d - 1) / (1 - d) on (89,990 updates for 0.9999, 1,790 for 0.995).

    Args:
        model: the network to average; `ema.module` is a copy holding the averaged weights.
        decay: d in ema = d * ema + (1 - d) * weights, once warmed up.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__(model, use_buffers=True)
        self.decay = decay

    def current_decay(self) -> torch.Tensor:
        """() float tensor on the device: the decay the next update applies; 0 for the first
        (a copy of the weights)."""
        n = self.n_averaged.float()
        warm = torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)
        return torch.where(self.n_averaged == 0, 0.0, warm)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module, taken: torch.Tensor | None = None) -> None:
        """ema <- ema + (1 - decay_n) (weights - ema), with decay_n from current_decay.

        Args:
            model: the trained network, on the EMA's device.
            taken: bool scalar on the device; where False (a skipped step) nothing changes,
                n_averaged included. None = True.
        """
        pairs = [
            (a, c.detach())
            for a, c in zip(
                (*self.module.parameters(), *self.module.buffers()),
                (*model.parameters(), *model.buffers()),
                strict=True,
            )
            if a.is_floating_point()
        ]
        averaged, current = [a for a, _ in pairs], [c for _, c in pairs]
        weight = 1.0 - self.current_decay()
        if taken is not None:
            weight = weight * taken
        delta = torch._foreach_sub(current, averaged)
        torch._foreach_mul_(delta, weight)  # a tensor weight: no host read (lerp would read it)
        torch._foreach_add_(averaged, delta)
        self.n_averaged += 1 if taken is None else taken.long()


def build_ema(model: nn.Module, decay: float = 0.9999) -> EMA:
    """An exponential moving average of model's weights and buffers (see EMA).

    ema.module is a copy of the model holding the averaged weights; update it with
    `ema.update_parameters(model)` after each optimizer step.
    """
    return EMA(model, decay)


@dataclass
class TrainingState:
    """Everything a run trains, how it steps, and how far it got.

    `dirty` is set while an epoch is being trained and cleared when it completes: a dirty state
    holds weights from the middle of an epoch and must be restored before training again.
    `epoch_step` counts the batches of epoch `epoch + 1` already trained (after a resume from a
    mid-epoch checkpoint); training goes on from there.
    """

    diffusion: DiffusionModel
    optimizer: Optimizer
    scheduler: LambdaLR | None = None  # stepped after every batch
    ema: EMA | None = None
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    precision: Precision = "fp32"  # autocast to bf16 / fp16 for those
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    epoch: int = 0  # epochs completed
    global_step: int = 0  # training steps taken (batches consumed)
    epoch_step: int = 0  # batches of the next epoch already taken
    dirty: bool = False
    compiled: bool = False
    settings: dict[str, Any] = field(default_factory=dict, repr=False)  # saved in snapshots
    # What builds the network again without the settings (saved in snapshots; see
    # ddpm.generate.architecture): {"model": ..., "diffusion": ..., "image_shape": ...}.
    architecture: dict[str, Any] = field(default_factory=dict, repr=False)
    initial: dict[str, Any] = field(default_factory=dict, repr=False)  # restore point at build

    @property
    def device(self) -> torch.device:
        return self.diffusion.betas.device

    def to(self, device: torch.device | str) -> TrainingState:
        """Move model, EMA and optimizer state to device (a no-op where they already are)."""
        device = torch.device(device)
        if self.device != device:
            self.diffusion.to(device)
            if self.ema is not None:
                self.ema.to(device)
            # load_state_dict puts each state tensor where its parameter now lives, by torch's
            # own rules (Adam's step stays on the CPU unless the optimizer is fused/capturable).
            self.optimizer.load_state_dict(self.optimizer.state_dict())
        return self

    def snapshot(self) -> dict[str, Any]:
        """A CPU copy of everything needed to resume exactly (and `settings`), safe to hand to
        a writer while training goes on: plain values and tensors only, as checkpoints hold."""

        def state_of(part: Any) -> dict[str, Any] | None:
            return part.state_dict() if part is not None else None

        return to_cpu(
            {
                "model": self.diffusion.state_dict(),
                "ema": state_of(self.ema),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": state_of(self.scheduler),
                "scaler": state_of(self.scaler),
                "epoch": self.epoch,  # epochs completed
                "global_step": self.global_step,
                "epoch_step": self.epoch_step,  # batches of the next epoch taken
                "rng": capture_rng_state(),
                "settings": dict(self.settings),
                "architecture": dict(self.architecture),
                "versions": package_versions(),
            }
        )

    def restore(self, state: Mapping[str, Any], source: str = "the snapshot") -> None:
        """Load a snapshot (or checkpoint) into this state, wherever it lives, RNGs included.

        Raises:
            CheckpointError: naming `source`, if it holds another format or model shape.
        """
        arch = (self.architecture.get("model") or {}).get("arch")
        check_compatible(state, self.diffusion, source, arch)
        self.diffusion.load_state_dict(state["model"])
        # Which kernels step the optimizer (fused, foreach) is this machine's choice, not the
        # checkpoint's: load_state_dict takes every group setting from what it loads, and
        # places the state for it (a fused optimizer keeps its step counts beside the
        # parameters, an unfused one on the CPU), each tensor on its parameter's device.
        saved = state["optimizer"]
        kernels = {k: self.optimizer.defaults.get(k) for k in ("fused", "foreach")}
        groups = [{**group, **kernels} for group in saved["param_groups"]]
        self.optimizer.load_state_dict({**saved, "param_groups": groups})
        for part, key in (
            (self.scheduler, "scheduler"),
            (self.ema, "ema"),
            (self.scaler, "scaler"),
        ):
            if part is not None and state.get(key):
                part.load_state_dict(state[key])
        restore_rng_state(state["rng"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.epoch_step, self.dirty = state.get("epoch_step", 0), False


class StepResult(NamedTuple):
    """One training step, as tensors still on the device (reading them waits for it)."""

    loss: torch.Tensor  # () the batch loss
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
    """What one epoch did."""

    epoch: int  # the epoch trained, from 1
    global_step: int  # steps taken by the run after it
    loss: float  # mean loss of the steps with a finite loss
    lr: float  # the lr the last step used
    bad_steps: int  # steps skipped as non-finite
    steps: int  # steps run in this call (fewer than an epoch's after a mid-epoch resume)
    images: int  # images seen
    images_per_s: float
    seconds: float  # wall time
    stopped: bool = False  # ended early at a stop request; the epoch's other batches are to do


def _masks_on_device(optimizer: Optimizer) -> bool:
    """Whether the optimizer can skip an update on a device-side flag (fused kernels read
    `found_inf`, the mechanism torch.amp.GradScaler uses)."""
    return bool(optimizer.param_groups[0].get("fused")) and getattr(
        optimizer, "_step_supports_amp_scaling", False
    )


def _optimize(state: TrainingState, x0: torch.Tensor, shard: Shard | None = None) -> StepResult:
    """One optimizer step on a batch, skipped when the loss or the gradient is not finite.

    The forward runs under autocast for bf16/fp16; fp16 needs the state's scaler, which also
    skips (and lowers its scale) when the scaled gradient overflows. A skipped step changes no
    weight, optimizer moment or EMA; the lr schedule advances with every batch, taken or not.

    With a fused optimizer nothing here waits for the device: the skip is a device-side flag
    (`found_inf`) the fused kernel and the EMA update read. Other optimizers (the CPU default,
    where waiting costs nothing) check finiteness on the host.

    With a shard (data-parallel training), x0 is the global batch: t and eps are drawn for all
    of it, this rank trains its slice, and the loss reported (and checked) is the global one,
    so every rank takes or skips the step alike.
    """
    diffusion, optimizer, scaler = state.diffusion, state.optimizer, state.scaler
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    with autocast(x0.device.type, state.precision):
        if shard is None:
            loss = diffusion(x0)
        else:
            loss = shard.loss(x0, *diffusion.draw_training_noise(x0))
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(
        diffusion.parameters(), state.grad_clip if state.grad_clip > 0 else math.inf
    )
    loss = loss.detach() if shard is None else shard.mean(loss.detach().float())
    loss_finite = torch.isfinite(loss)
    taken = loss_finite & torch.isfinite(grad_norm)
    if scaler is not None:
        # The scaler finds the same non-finite gradients, skips, and lowers its scale; a
        # finite loss with overflowing fp16 gradients is its business, not divergence.
        scaler.step(optimizer)
        scaler.update()
        bad = ~loss_finite
    else:
        bad = ~taken
        if _masks_on_device(optimizer):
            optimizer.found_inf, optimizer.grad_scale = bad.float(), None
            try:
                optimizer.step()
            finally:
                optimizer.found_inf = None
        elif taken:
            optimizer.step()
    if state.scheduler is not None:
        state.scheduler.step()
    if state.ema is not None:
        state.ema.update_parameters(diffusion, taken)
    return StepResult(loss, grad_norm, taken, bad, lr)


def train_step(state: TrainingState, x0: torch.Tensor) -> float:
    """One training step: loss, backward, clip, optimizer, lr schedule and EMA updates.

    Args:
        state: the model (in train mode, on x0's device), its optimizer and the optional
            scheduler, EMA, gradient clipping, precision and fp16 scaler. Its step counters
            are left alone (train_epoch keeps them).
        x0: (B, C, H, W) clean images in [-1, 1].

    Returns:
        the batch loss as a Python float (NaN or inf when the step was skipped); reading it
        waits for the device.
    """
    return _optimize(state, x0).loss.item()


StepCallback = Callable[[int, StepMetrics], None]


class _Reader:
    """Reads queued steps' results from the device in one go, checks for divergence, and
    hands each step's metrics on; keeps the epoch's totals."""

    def __init__(self, first_step: int, on_step: StepCallback | None, max_bad: int | None) -> None:
        self.next_step, self.on_step, self.max_bad = first_step + 1, on_step, max_bad
        self.pending: list[tuple[torch.Tensor, float]] = []  # (stats (4,), lr) per step
        self.loss_sum, self.steps, self.bad, self.bad_in_a_row = 0.0, 0, 0, 0

    def queue(self, step: StepResult) -> None:
        stats = torch.stack([step.loss.float(), step.grad_norm.float(), step.taken, step.bad])
        self.pending.append((stats, step.lr))

    def read(self) -> None:
        if not self.pending:
            return
        values = torch.stack([stats for stats, _ in self.pending]).tolist()  # waits
        for (loss, grad_norm, taken, bad), (_, lr) in zip(values, self.pending, strict=True):
            self.steps += 1
            if bad:
                self.bad += 1
                self.bad_in_a_row += 1
                if self.max_bad is not None and self.bad_in_a_row > self.max_bad:
                    raise TrainingDiverged(
                        f"loss or gradient not finite for {self.bad_in_a_row} steps in a row "
                        f"(more than train.max_bad_steps = {self.max_bad}); last loss "
                        f"{loss}, gradient norm {grad_norm}"
                    )
            else:
                self.loss_sum += loss  # overflowed fp16 steps had a finite loss
                self.bad_in_a_row = 0
            if self.on_step is not None:
                self.on_step(self.next_step, StepMetrics(loss, lr, grad_norm, not taken))
            self.next_step += 1
        self.pending.clear()


def train_epoch(
    state: TrainingState,
    batches: Iterable[torch.Tensor],
    *,
    on_step: StepCallback | None = None,
    after_step: Callable[[], None] | None = None,
    read_every: int = 1,
    max_bad_steps: int | None = None,
    stop: Callable[[], bool] | None = None,
    shard: Shard | None = None,
) -> EpochResult:
    """Train on every batch of the state's next epoch, counting its steps.

    Steps do not wait for the device: each step's loss, gradient norm and outcome stay there
    and are read together every `read_every` steps and at the end (one sync per read);
    `on_step` and the divergence check run then, once per step, in order.

    Args:
        state: as for train_step; global_step and epoch_step count each batch. epoch and
            dirty are the caller's (see run.run_epoch).
        batches: (B, C, H, W) float batches in [-1, 1] on any device; moved to the state's.
        on_step: called at each read, for every step since the last, with (the run's step
            number after it, its StepMetrics).
        after_step: called right after each step is queued, its counters updated, with
            nothing read (bookkeeping that must not wait for the device).
        read_every: steps between reads; 1 reads (and waits) after every step.
        max_bad_steps: raise TrainingDiverged when more steps than this in a row have a
            non-finite loss or gradient (skipped steps); None never raises. Found at the next
            read, so up to read_every - 1 further steps may have run. Steps the fp16 scaler
            skips on overflow (it then lowers its scale) do not count.
        stop: asked before each step; when it answers True the epoch ends there, with
            `stopped` set and every step taken so far read (a step is never cut short).
        shard: train this rank's slice of each (global) batch (ddpm.distributed).
    """
    if read_every < 1:
        raise ValueError(f"read_every must be at least 1, got {read_every}")
    state.diffusion.train()
    device = state.device
    reader = _Reader(state.global_step, on_step, max_bad_steps)
    images, lr = 0, state.optimizer.param_groups[0]["lr"]
    start, stopped = time.perf_counter(), False
    for x0 in batches:
        if stop is not None and stop():
            stopped = True
            break
        x0 = x0.to(device, non_blocking=True)
        step = _optimize(state, x0, shard)
        reader.queue(step)
        images, lr = images + x0.shape[0], step.lr
        state.global_step += 1
        state.epoch_step += 1
        if after_step is not None:
            after_step()
        if len(reader.pending) >= read_every:
            reader.read()
    reader.read()
    seconds = time.perf_counter() - start
    return EpochResult(
        epoch=state.epoch + 1,
        global_step=state.global_step,
        loss=reader.loss_sum / max(reader.steps - reader.bad, 1),
        lr=lr,
        bad_steps=reader.bad,
        steps=reader.steps,
        images=images,
        images_per_s=images / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        stopped=stopped,
    )
