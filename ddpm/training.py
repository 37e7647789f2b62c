"""Optimizers, learning-rate schedules, EMA, and the training step and epoch."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ddpm.diffusion import DiffusionModel


class TrainingDiverged(RuntimeError):
    """The loss or the gradient was not finite for more steps in a row than allowed."""


Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def build_lr_scheduler(
    optimizer: Optimizer,
    warmup_steps: int = 0,
    total_steps: int = 1,
    schedule: Literal["constant", "cosine"] = "constant",
) -> LambdaLR:
    """A per-step LambdaLR following `lr_factor`; call `.step()` after each optimizer step."""
    lr_factor(0, warmup_steps, total_steps, schedule)  # fail now on an unknown schedule
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, schedule))


def build_ema(model: nn.Module, decay: float = 0.9999) -> AveragedModel:
    """An exponential moving average of model's weights and buffers (torch.optim.swa_utils).

    ema.module is a copy of the model holding the averaged weights; update it with
    `ema.update_parameters(model)` after each optimizer step.
    """
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _optimize(
    diffusion: DiffusionModel,
    optimizer: Optimizer,
    x0: torch.Tensor,
    scheduler: LambdaLR | None,
    ema: AveragedModel | None,
    grad_clip: float,
    precision: Precision = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """One optimizer step on a batch, skipped when the loss or the gradient is not finite.

    The forward runs under autocast for bf16/fp16; fp16 needs `scaler`, which also skips (and
    lowers its scale) when the scaled gradient overflows. A skipped step changes nothing: no
    optimizer, schedule or EMA update.

    Returns:
        (loss, gradient norm before clipping) on the device, the lr this step used, and what
        happened: "taken", "bad" (non-finite loss or gradient) or "overflow" (fp16 scaler).
    """
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    dtype = AUTOCAST_DTYPES.get(precision)
    with torch.autocast(x0.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        loss = diffusion(x0)
    if not torch.isfinite(loss):
        return loss.detach(), torch.full((), math.nan), lr, "bad"
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(
        diffusion.parameters(), grad_clip if grad_clip > 0 else math.inf
    )
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skips the update itself when the scaled gradient overflowed
        scaler.update()
        if scaler.get_scale() < scale:
            return loss.detach(), grad_norm, lr, "overflow"
    elif not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm, lr, "bad"
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update_parameters(diffusion)
    return loss.detach(), grad_norm, lr, "taken"


def train_step(
    diffusion: DiffusionModel,
    optimizer: Optimizer,
    x0: torch.Tensor,
    *,
    scheduler: LambdaLR | None = None,
    ema: AveragedModel | None = None,
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
        the batch loss as a Python float (NaN or inf when the step was skipped).
    """
    loss, _, _, _ = _optimize(
        diffusion, optimizer, x0, scheduler, ema, grad_clip, precision, scaler
    )
    return loss.item()


StepCallback = Callable[[int, dict[str, float]], None]


def train_epoch(
    diffusion: DiffusionModel,
    optimizer: Optimizer,
    batches: Iterable[torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    scheduler: LambdaLR | None = None,
    ema: AveragedModel | None = None,
    grad_clip: float = 0.0,
    on_step: StepCallback | None = None,
    max_bad_steps: int | None = None,
    precision: Precision = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Train on every batch of one epoch.

    Args:
        diffusion: the model, already on `device`.
        optimizer, scheduler, ema, grad_clip: as in train_step.
        batches: (B, C, H, W) float batches in [-1, 1] on any device.
        device: where the model lives; batches are moved there.
        on_step: called after each step with (step index in this epoch, {"loss", "lr" used by
            the step, "grad_norm" before clipping, "skipped" 1.0 if it was}) as Python floats.
        max_bad_steps: raise TrainingDiverged when more steps than this in a row have a
            non-finite loss or gradient (skipped steps); None never raises. Steps the fp16
            scaler skips on overflow (it then lowers its scale) do not count.
        precision, scaler: as in train_step.

    Returns:
        {"loss": mean loss of the steps taken, "lr": lr the last step used,
         "bad_steps": steps skipped, "steps": steps taken,
         "images": images seen, "images_per_s": throughput, "seconds": wall time}.
    """
    diffusion.train()
    device = torch.device(device)
    total_loss, steps, images, lr = 0.0, 0, 0, optimizer.param_groups[0]["lr"]
    bad, bad_in_a_row = 0, 0
    start = time.perf_counter()
    for x0 in batches:
        x0 = x0.to(device, non_blocking=True)
        loss, grad_norm, lr, outcome = _optimize(
            diffusion, optimizer, x0, scheduler, ema, grad_clip, precision, scaler
        )
        taken = outcome == "taken"
        loss_value = loss.item()
        steps += 1
        images += x0.shape[0]
        if outcome != "bad":
            total_loss += loss_value
            bad_in_a_row = 0
        else:
            bad += 1
            bad_in_a_row += 1
            if max_bad_steps is not None and bad_in_a_row > max_bad_steps:
                raise TrainingDiverged(
                    f"loss or gradient not finite for {bad_in_a_row} steps in a row (more than "
                    f"train.max_bad_steps = {max_bad_steps}); last loss {loss_value}, "
                    f"gradient norm {float(grad_norm)}"
                )
        if on_step is not None:
            on_step(
                steps - 1,
                {
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "skipped": 0.0 if taken else 1.0,
                },
            )
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / max(steps - bad, 1),  # overflowed fp16 steps had a finite loss
        "lr": lr,
        "bad_steps": bad,
        "steps": steps,
        "images": images,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }
