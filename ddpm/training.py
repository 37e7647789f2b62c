"""Optimizers, learning-rate schedules, EMA and the training state (the loop: ddpm.trainer)."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

from ddpm.checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_compatible,
    package_versions,
    restore_rng_state,
    to_cpu,
)
from ddpm.config import OptimConfig, Precision
from ddpm.diffusion import DiffusionModel
from ddpm.phema import PROFILES, power_decay, sigma_rel_to_gamma

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


def seed_everything(seed: int, deterministic: bool) -> None:
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


def resolve_device(name: str) -> torch.device:
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
    params: Iterable[nn.Parameter], optim: OptimConfig, fused: bool = False
) -> Optimizer:
    """optim.name's optimizer with optim.lr, optim.momentum and optim.weight_decay.

    Args:
        params: parameters to optimize.
        optim: name (adam, adamw or sgd), lr, momentum (SGD momentum, or beta1 of Adam/AdamW;
            beta2 stays 0.999) and weight_decay (L2 penalty for Adam and SGD, decoupled for
            AdamW).
        fused: one fused kernel per step for all parameters (fast on CUDA).
    """
    common = {"lr": optim.lr, "weight_decay": optim.weight_decay, "fused": fused or None}
    if optim.name == "adam":
        return torch.optim.Adam(params, betas=(optim.momentum, 0.999), **common)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, betas=(optim.momentum, 0.999), **common)
    if optim.name == "sgd":
        return torch.optim.SGD(params, momentum=optim.momentum, **common)
    raise ValueError(f"unknown optimizer {optim.name!r}; expected adam, adamw or sgd")


def lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    schedule: Literal["constant", "cosine"],
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
    warmup_steps: int,
    total_steps: int,
    schedule: Literal["constant", "cosine"],
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

    With `gamma`, a power-function EMA instead (EDM2, ddpm.phema): update k decays by
    (1 - 1/k)^(gamma + 1), averaging step k's weights with weight proportional to k^gamma.

    Args:
        model: the network to average; `ema.module` is a copy holding the averaged weights.
        decay: d in ema = d * ema + (1 - d) * weights, once warmed up.
        gamma: the power-function profile's exponent (ddpm.phema.sigma_rel_to_gamma); None:
            the warmed-up exponential decay above.
    """

    def __init__(self, model: nn.Module, decay: float, gamma: float | None = None) -> None:
        super().__init__(model, use_buffers=True)
        self.decay, self.gamma = decay, gamma

    def current_decay(self) -> torch.Tensor:
        """() float tensor on the device: the decay the next update applies; 0 for the first
        (a copy of the weights)."""
        if self.gamma is not None:
            return power_decay(self.gamma, self.n_averaged + 1)
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
        # Private torch._foreach_* ops, kept: on CUDA each is a fused multi-tensor kernel, a few
        # launches for all the tensors, where a loop of public in-place ops (the same bits)
        # launches three per tensor (915 a step for the paper's network). torch < 2.15 has no
        # public list op; on CPU the two cost the same (loop/foreach 1.06 on 137 tensors).
        delta = torch._foreach_sub(current, averaged)
        torch._foreach_mul_(delta, weight)  # a tensor weight: no host read (lerp would read it)
        torch._foreach_add_(averaged, delta)
        self.n_averaged += 1 if taken is None else taken.long()


def power_emas(model: nn.Module, snapshots: int) -> dict[float, EMA]:
    """The power-function EMAs of post-hoc EMA (sigma_rel 0.05 and 0.10, EDM2's), by sigma_rel;
    none when snapshots is 0."""
    if not snapshots:
        return {}
    return {s: EMA(model, 0.0, gamma=sigma_rel_to_gamma(s)) for s in PROFILES}


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
    # Post-hoc EMA (ddpm.phema): power-function EMAs by sigma_rel, snapshotted every
    # ema_snapshot_every steps (0 = never) into the run's ema/ folder.
    profiles: dict[float, EMA] = field(default_factory=dict)
    ema_snapshot_every: int = 0
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
            for profile in self.profiles.values():
                profile.to(device)
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
                "ema_profiles": {str(s): p.state_dict() for s, p in self.profiles.items()} or None,
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
        if self.profiles:
            saved = state.get("ema_profiles") or {}
            missing = [s for s in self.profiles if str(s) not in saved]
            if missing:
                raise CheckpointError(
                    f"{source} was trained without train.ema_snapshots: the power-function "
                    "EMAs must cover a run from its start; set train.ema_snapshots 0 to resume "
                    "it, or start a new run"
                )
            for s, profile in self.profiles.items():
                profile.load_state_dict(saved[str(s)])
        restore_rng_state(state["rng"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.epoch_step, self.dirty = state.get("epoch_step", 0), False
