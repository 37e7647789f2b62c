"""Optimizers, learning-rate schedules, EMA, and the training step and epoch."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

from ddpm.diffusion import DiffusionModel


class TrainingDiverged(RuntimeError):
    """The loss or the gradient was not finite for more steps in a row than allowed."""


Precision = Literal["fp32", "bf16", "fp16"]
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


class StepResult(NamedTuple):
    """One training step, as tensors still on the device (reading them waits for it)."""

    loss: torch.Tensor  # () the batch loss
    grad_norm: torch.Tensor  # () gradient norm before clipping
    taken: torch.Tensor  # () bool: the update was applied
    bad: torch.Tensor  # () bool: loss or gradient not finite (fp16 overflows are not bad)
    lr: float  # the lr the step used


def _masks_on_device(optimizer: Optimizer) -> bool:
    """Whether the optimizer can skip an update on a device-side flag (fused kernels read
    `found_inf`, the mechanism torch.amp.GradScaler uses)."""
    return bool(optimizer.param_groups[0].get("fused")) and getattr(
        optimizer, "_step_supports_amp_scaling", False
    )


def _optimize(
    diffusion: DiffusionModel,
    optimizer: Optimizer,
    x0: torch.Tensor,
    scheduler: LambdaLR | None,
    ema: EMA | None,
    grad_clip: float,
    precision: Precision = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One optimizer step on a batch, skipped when the loss or the gradient is not finite.

    The forward runs under autocast for bf16/fp16; fp16 needs `scaler`, which also skips (and
    lowers its scale) when the scaled gradient overflows. A skipped step changes no weight,
    optimizer moment or EMA; the lr schedule advances with every batch, taken or not.

    With a fused optimizer nothing here waits for the device: the skip is a device-side flag
    (`found_inf`) the fused kernel and the EMA update read. Other optimizers (the CPU default,
    where waiting costs nothing) check finiteness on the host.
    """
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    with autocast(x0.device.type, precision):
        loss = diffusion(x0)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(
        diffusion.parameters(), grad_clip if grad_clip > 0 else math.inf
    )
    loss = loss.detach()
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
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update_parameters(diffusion, taken)
    return StepResult(loss, grad_norm, taken, bad, lr)


def train_step(
    diffusion: DiffusionModel,
    optimizer: Optimizer,
    x0: torch.Tensor,
    *,
    scheduler: LambdaLR | None = None,
    ema: EMA | None = None,
    grad_clip: float = 0.0,
    precision: Precision = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One training step: loss, backward, clip, optimizer, lr schedule and EMA updates.

    Args:
        diffusion: the model, in train mode, on x0's device.
        optimizer: over diffusion's parameters.
        x0: (B, C, H, W) clean images in [-1, 1].
        scheduler: per-step lr schedule, stepped after the optimizer.
        ema: averaged copy, updated after the optimizer.
        grad_clip: max gradient norm; 0 = no clipping.
        precision: fp32, or autocast to bf16 / fp16 (fp16 needs scaler).
        scaler: torch.amp.GradScaler for fp16.

    Returns:
        the batch loss as a Python float (NaN or inf when the step was skipped); reading it
        waits for the device.
    """
    result = _optimize(diffusion, optimizer, x0, scheduler, ema, grad_clip, precision, scaler)
    return result.loss.item()


StepCallback = Callable[[int, dict[str, float]], None]


def train_epoch(
    diffusion: DiffusionModel,
    optimizer: Optimizer,
    batches: Iterable[torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    scheduler: LambdaLR | None = None,
    ema: EMA | None = None,
    grad_clip: float = 0.0,
    on_step: StepCallback | None = None,
    after_step: Callable[[], None] | None = None,
    read_every: int = 1,
    max_bad_steps: int | None = None,
    precision: Precision = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Train on every batch of one epoch.

    Steps do not wait for the device: each step's loss, gradient norm and outcome stay there
    and are read together every `read_every` steps and at the end of the epoch (one sync per
    read); `on_step` and the divergence check run then, once per step, in order.

    Args:
        diffusion: the model, already on `device`.
        optimizer, scheduler, ema, grad_clip: as in train_step.
        batches: (B, C, H, W) float batches in [-1, 1] on any device.
        device: where the model lives; batches are moved there.
        on_step: called at each read, for every step since the last, with (step index in this
            epoch, {"loss", "lr" used by the step, "grad_norm" before clipping, "skipped" 1.0
            if it was}) as Python floats.
        after_step: called right after each step is queued, with nothing read (bookkeeping
            that must not wait for the device).
        read_every: steps between reads; 1 reads (and waits) after every step.
        max_bad_steps: raise TrainingDiverged when more steps than this in a row have a
            non-finite loss or gradient (skipped steps); None never raises. Found at the next
            read, so up to read_every - 1 further steps may have run. Steps the fp16 scaler
            skips on overflow (it then lowers its scale) do not count.
        precision, scaler: as in train_step.

    Returns:
        {"loss": mean loss of the steps with a finite loss, "lr": lr the last step used,
         "bad_steps": steps skipped as non-finite, "steps": steps run,
         "images": images seen, "images_per_s": throughput, "seconds": wall time}.
    """
    if read_every < 1:
        raise ValueError(f"read_every must be at least 1, got {read_every}")
    diffusion.train()
    device = torch.device(device)
    pending: list[tuple[torch.Tensor, float]] = []  # (stats (4,) on the device, lr) per step
    total = {"loss": 0.0, "steps": 0, "bad": 0, "bad_in_a_row": 0}
    images, lr = 0, optimizer.param_groups[0]["lr"]

    def read() -> None:
        values = torch.stack([stats for stats, _ in pending]).tolist()  # waits for the device
        for (loss, grad_norm, taken, bad), (_, step_lr) in zip(values, pending, strict=True):
            index = total["steps"]
            total["steps"] += 1
            if bad:
                total["bad"] += 1
                total["bad_in_a_row"] += 1
                if max_bad_steps is not None and total["bad_in_a_row"] > max_bad_steps:
                    raise TrainingDiverged(
                        f"loss or gradient not finite for {total['bad_in_a_row']} steps in a "
                        f"row (more than train.max_bad_steps = {max_bad_steps}); last loss "
                        f"{loss}, gradient norm {grad_norm}"
                    )
            else:
                total["loss"] += loss  # overflowed fp16 steps had a finite loss
                total["bad_in_a_row"] = 0
            if on_step is not None:
                metrics = {"loss": loss, "lr": step_lr, "grad_norm": grad_norm}
                on_step(index, {**metrics, "skipped": 0.0 if taken else 1.0})
        pending.clear()

    start = time.perf_counter()
    for x0 in batches:
        x0 = x0.to(device, non_blocking=True)
        step = _optimize(diffusion, optimizer, x0, scheduler, ema, grad_clip, precision, scaler)
        stats = torch.stack([step.loss.float(), step.grad_norm.float(), step.taken, step.bad])
        pending.append((stats, step.lr))
        images, lr = images + x0.shape[0], step.lr
        if after_step is not None:
            after_step()
        if len(pending) >= read_every:
            read()
    if pending:
        read()
    seconds = time.perf_counter() - start
    steps, bad = total["steps"], total["bad"]
    return {
        "loss": total["loss"] / max(steps - bad, 1),
        "lr": lr,
        "bad_steps": bad,
        "steps": steps,
        "images": images,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }
