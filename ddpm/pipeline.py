"""One training run: its state, and the operations a workflow composes from it.

build_or_resume -> (run_epoch -> save snapshot -> draw_samples)* ; every function takes plain
arguments, so a notebook, a script or an orchestrator can drive it alike.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Dataset, Subset

from ddpm.checkpoint import (
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    to_cpu,
    training_state,
)
from ddpm.data import (
    DatasetError,
    ImageFolderDataset,
    TensorImageDataset,
    download_cifar10,
    epoch_batches,
    load_cifar10,
    steps_per_epoch,
    subset_indices,
)
from ddpm.diffusion import DiffusionModel
from ddpm.training import (
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    seed_everything,
    train_epoch,
)
from ddpm.unet import UNet

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^epoch_(\d+)\.pt$")


@dataclass
class TrainingState:
    """Everything a run trains, and how far it got.

    `dirty` is set while an epoch is being trained and cleared when it completes: a dirty state
    holds weights from the middle of an epoch and must be restored before training again.
    """

    diffusion: DiffusionModel
    optimizer: Optimizer
    scheduler: LambdaLR
    ema: AveragedModel
    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    dirty: bool = False
    initial: dict[str, Any] = field(default_factory=dict, repr=False)  # restore point at build

    @property
    def device(self) -> torch.device:
        return self.diffusion.betas.device

    def to(self, device: torch.device | str) -> TrainingState:
        """Move model, EMA and optimizer state to device (a no-op where they already are)."""
        device = torch.device(device)
        if self.device != device:
            self.diffusion.to(device)
            self.ema.to(device)
            for param_state in self.optimizer.state.values():
                for key, value in param_state.items():
                    # Adam keeps its step count on the CPU unless fused/capturable.
                    if isinstance(value, torch.Tensor) and key != "step":
                        param_state[key] = value.to(device)
        return self

    def snapshot(self, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A CPU copy of the whole state, safe to hand to a writer while training goes on."""
        return training_state(
            self.diffusion,
            self.optimizer,
            self.scheduler,
            self.ema,
            epoch=self.epoch,
            global_step=self.global_step,
            settings=settings,
        )

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a snapshot (or checkpoint) into this state, wherever it lives, RNGs included."""
        # Optimizer.load_state_dict puts each state tensor on its parameter's device.
        restore_training_state(state, self.diffusion, self.optimizer, self.scheduler, self.ema)
        self.epoch, self.global_step, self.dirty = state["epoch"], state["global_step"], False


def build_training(
    *,
    hidden_size: int,
    channels: int,
    num_timesteps: int,
    beta_start: float,
    beta_end: float,
    optimizer: Literal["adam", "adamw", "sgd"],
    lr: float,
    momentum: float,
    weight_decay: float,
    warmup_steps: int,
    schedule: Literal["constant", "cosine"],
    total_steps: int,
    ema_decay: float,
    seed: int,
    deterministic: bool = False,
) -> TrainingState:
    """Build a fresh run's U-Net, DiffusionModel, optimizer, lr schedule and EMA on the CPU.

    The weights come from `seed`, so two builds with the same arguments are identical.
    """
    seed_everything(seed, deterministic)
    diffusion = DiffusionModel(
        UNet(channels, channels, hidden_size), (beta_start, beta_end), num_timesteps
    )
    opt = build_optimizer(diffusion.parameters(), optimizer, lr, momentum, weight_decay)
    scheduler = build_lr_scheduler(opt, warmup_steps, total_steps, schedule)
    state = TrainingState(diffusion, opt, scheduler, build_ema(diffusion, ema_decay))
    state.initial = state.snapshot()
    return state


# ---- checkpoint files -----------------------------------------------------------------------


def epoch_checkpoint(folder: Path, epoch: int) -> Path:
    """folder/epoch_XXX.pt, epochs numbered from 1."""
    return Path(folder) / f"epoch_{epoch:03d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """The epoch checkpoints in folder, oldest epoch first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_newest_valid(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in folder that loads, with its state; None if there is none.

    A checkpoint that fails to load (truncated, corrupt, or carrying a pickled payload that
    weights_only refuses) is reported in one warning line and the next older one is tried.
    """
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("skipping unreadable checkpoint %s: %s", path, reason)
    return None


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` epoch checkpoints; returns the deleted paths."""
    old = list_checkpoints(folder)[:-keep] if keep > 0 else []
    for path in old:
        path.unlink(missing_ok=True)
    return old


def save_epoch_checkpoint(snapshot: Mapping[str, Any], folder: Path, epoch: int, keep: int) -> Path:
    """Atomically write folder/epoch_XXX.pt, then keep only the newest `keep`."""
    path = save_checkpoint(epoch_checkpoint(folder, epoch), snapshot)
    prune_checkpoints(folder, keep)
    return path


def build_or_resume(checkpoint_dir: Path, **build_kwargs: Any) -> TrainingState:
    """build_training(**build_kwargs), then restore the newest valid checkpoint if any."""
    state = build_training(**build_kwargs)
    found = load_newest_valid(checkpoint_dir)
    if found is not None:
        path, checkpoint = found
        state.restore(checkpoint)
        log.info("resuming from %s (epoch %d, step %d)", path, state.epoch, state.global_step)
    return state


def rewind(state: TrainingState, checkpoint_dir: Path) -> str:
    """Put a dirty state back to its newest valid checkpoint (or its initial weights).

    Returns:
        what it was restored from, for the log.
    """
    found = load_newest_valid(checkpoint_dir)
    if found is not None:
        state.restore(found[1])
        return str(found[0])
    state.restore(state.initial)
    return "the initial weights"


# ---- data -----------------------------------------------------------------------------------


def locate_dataset(dataset: str, root: Path, url: str, folder: Path | None) -> Path:
    """Where the dataset is: CIFAR-10 downloaded and verified under root, or the image folder.

    Raises:
        DatasetError: if it cannot be had; the message says where to put it.
    """
    if dataset == "cifar10":
        return download_cifar10(Path(root), url)
    if dataset == "folder":
        if folder is None or not Path(folder).is_dir():
            raise DatasetError(f"image folder {folder} does not exist; set data.folder")
        return Path(folder)
    raise ValueError(f"unknown dataset {dataset!r}; expected cifar10 or folder")


@functools.lru_cache(maxsize=1)
def load_dataset(
    dataset: str, path: str, image_size: int, channels: int, subset: int, seed: int
) -> Dataset:
    """The training images: CIFAR-10 in memory, or an image folder read lazily.

    Cached for the process (one dataset), so epochs after the first do not read it again.
    Items are uint8 (C, H, W).
    """
    if dataset == "cifar10":
        images = load_cifar10(Path(path))
        return TensorImageDataset(images[subset_indices(len(images), subset, seed)])
    images = ImageFolderDataset(Path(path), image_size, channels)
    return images if subset == 0 else Subset(images, subset_indices(len(images), subset, seed))


# ---- epochs and samples ---------------------------------------------------------------------


def run_epoch(
    state: TrainingState,
    dataset: Dataset,
    epoch: int,
    *,
    batch_size: int,
    seed: int,
    random_flip: bool,
    num_workers: int,
    grad_clip: float,
    device: torch.device | str,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train epoch number `epoch` (from 1) on device; the state records it when it completes.

    Args:
        on_step: called with (global step after the step, step metrics) after each step.

    Returns:
        train_epoch's metrics plus "epoch", "global_step" and "steps_per_epoch".
    """
    state.to(device)
    state.dirty = True
    start = state.global_step
    metrics = train_epoch(
        state.diffusion,
        state.optimizer,
        epoch_batches(
            dataset,
            batch_size,
            seed=seed,
            epoch=epoch,
            random_flip=random_flip,
            num_workers=num_workers,
        ),
        device=device,
        scheduler=state.scheduler,
        ema=state.ema,
        grad_clip=grad_clip,
        on_step=None if on_step is None else lambda i, m: on_step(start + i + 1, m),
    )
    state.epoch, state.global_step, state.dirty = epoch, start + metrics["steps"], False
    return {
        **metrics,
        "epoch": epoch,
        "global_step": state.global_step,
        "steps_per_epoch": steps_per_epoch(len(dataset), batch_size),
    }


def draw_samples(
    state: TrainingState,
    *,
    num: int,
    image_shape: tuple[int, int, int],
    sampler: Literal["ddpm", "ddim"],
    steps: int,
    seed: int,
    use_ema: bool,
    device: torch.device | str,
) -> torch.Tensor:
    """Sample a batch from fixed noise: the same seed gives the same noise every epoch.

    The noise comes from a CPU generator, so it is the same on any device, and the global RNG
    (which training draws from) is left untouched.

    Returns:
        (num, C, H, W) samples in [-1, 1], on the CPU.
    """
    state.to(device)
    model = state.ema.module if use_ema else state.diffusion
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        if sampler == "ddim":
            x = model.sample_ddim(num, image_shape, steps, generator=generator)
        else:
            x = model.sample(num, image_shape, generator=generator)
    finally:
        model.train(was_training)
    return to_cpu(x)
