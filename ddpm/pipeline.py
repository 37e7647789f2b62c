"""One training run: its state, and the operations a workflow composes from it.

build_or_resume -> (run_epoch -> save snapshot -> draw_samples)* ; every function takes plain
arguments, so a notebook, a script or an orchestrator can drive it alike.
"""

from __future__ import annotations

import functools
import logging
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset, Subset

from ddpm.checkpoint import (
    CheckpointWriter,
    check_compatible,
    checksum_path,
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
    device_epoch_batches,
    download_cifar10,
    fits_on,
    load_cifar10,
    shared_epoch_loader,
    steps_per_epoch,
    subset_indices,
)
from ddpm.diffusion import DiffusionModel
from ddpm.training import (
    EMA,
    Precision,
    autocast,
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    run_warmup_steps,
    seed_everything,
    train_epoch,
)
from ddpm.unet import UNet

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^epoch_(\d+)\.pt$")
STEP_CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.pt$")
STEP_CHECKPOINTS_KEPT = 2  # the newest mid-epoch checkpoint and one to fall back on


@dataclass
class TrainingState:
    """Everything a run trains, and how far it got.

    `dirty` is set while an epoch is being trained and cleared when it completes: a dirty state
    holds weights from the middle of an epoch and must be restored before training again.
    `epoch_step` counts the batches of epoch `epoch + 1` already trained (after a resume from a
    mid-epoch checkpoint); training goes on from there.
    """

    diffusion: DiffusionModel
    optimizer: Optimizer
    scheduler: LambdaLR
    ema: EMA
    epoch: int = 0  # epochs completed
    global_step: int = 0  # training steps taken (batches consumed)
    epoch_step: int = 0  # batches of the next epoch already taken
    dirty: bool = False
    initial: dict[str, Any] = field(default_factory=dict, repr=False)  # restore point at build
    precision: Precision = "fp32"
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    compiled: bool = False

    @property
    def device(self) -> torch.device:
        return self.diffusion.betas.device

    def to(self, device: torch.device | str) -> TrainingState:
        """Move model, EMA and optimizer state to device (a no-op where they already are)."""
        device = torch.device(device)
        if self.device != device:
            self.diffusion.to(device)
            self.ema.to(device)
            # load_state_dict puts each state tensor where its parameter now lives, by torch's
            # own rules (Adam's step stays on the CPU unless the optimizer is fused/capturable).
            self.optimizer.load_state_dict(self.optimizer.state_dict())
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
            epoch_step=self.epoch_step,
            settings=settings,
            scaler=self.scaler,
        )

    def restore(self, state: Mapping[str, Any], source: str = "the snapshot") -> None:
        """Load a snapshot (or checkpoint) into this state, wherever it lives, RNGs included.

        Raises:
            CheckpointError: naming `source`, if it holds another format or model shape.
        """
        check_compatible(state, self.diffusion, source)
        # Optimizer.load_state_dict puts each state tensor on its parameter's device.
        restore_training_state(
            state, self.diffusion, self.optimizer, self.scheduler, self.ema, scaler=self.scaler
        )
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.epoch_step, self.dirty = state.get("epoch_step", 0), False


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
    precision: Precision = "fp32",
    fused: bool = False,
    device_type: str = "cpu",
) -> TrainingState:
    """Build a fresh run's U-Net, DiffusionModel, optimizer, lr schedule and EMA on the CPU.

    The weights come from `seed`, so two builds with the same arguments are identical.

    Args:
        warmup_steps: lr warm-up, shortened to a tenth of total_steps where longer (see
            run_warmup_steps).
        precision: fp32, bf16 or fp16 (which gets a GradScaler for device_type).
        fused: fused optimizer kernels (for CUDA training).
    """
    seed_everything(seed, deterministic)
    diffusion = DiffusionModel(
        UNet(channels, channels, hidden_size), (beta_start, beta_end), num_timesteps
    )
    opt = build_optimizer(diffusion.parameters(), optimizer, lr, momentum, weight_decay, fused)
    # Decided once, when the run starts: a resumed run restores the schedule from its
    # checkpoint (see LRSchedule), so raising the epochs later keeps its warm-up.
    scheduler = build_lr_scheduler(
        opt, run_warmup_steps(warmup_steps, total_steps), total_steps, schedule
    )
    state = TrainingState(diffusion, opt, scheduler, build_ema(diffusion, ema_decay))
    state.precision = precision
    if precision == "fp16":
        state.scaler = torch.amp.GradScaler(device_type)
    state.initial = state.snapshot()
    return state


# ---- checkpoint files -----------------------------------------------------------------------


def epoch_checkpoint(folder: Path, epoch: int) -> Path:
    """folder/epoch_XXX.pt, epochs numbered from 1."""
    return Path(folder) / f"epoch_{epoch:03d}.pt"


def step_checkpoint(folder: Path, global_step: int) -> Path:
    """folder/step_XXXXXXX.pt: a mid-epoch checkpoint after `global_step` steps."""
    return Path(folder) / f"step_{global_step:07d}.pt"


def _numbered(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def list_checkpoints(folder: Path) -> list[Path]:
    """The epoch checkpoints in folder, oldest epoch first."""
    return _numbered(folder, CHECKPOINT_NAME)


def list_step_checkpoints(folder: Path) -> list[Path]:
    """The mid-epoch checkpoints in folder, oldest first."""
    return _numbered(folder, STEP_CHECKPOINT_NAME)


def _newest_loadable(paths: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path)
        except pickle.UnpicklingError:
            # torch's own message suggests weights_only=False: exactly what not to do here.
            log.warning(
                "skipping unusable checkpoint %s: refused by weights_only loading (it "
                "holds objects other than tensors; never load it unsafely)",
                path,
            )
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("skipping unusable checkpoint %s: %s", path, reason)
    return None


def load_newest_valid(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint in folder with the most steps that loads and matches its checksum, with
    its state; None if there is none.

    Epoch and mid-epoch checkpoints are compared by global step (an epoch checkpoint wins a
    tie). A checkpoint that fails to load (truncated, bit-flipped, or carrying a pickled
    payload that weights_only refuses) is reported in one warning line and the next older one
    is tried.
    """
    best = _newest_loadable(list_step_checkpoints(folder))
    epoch = _newest_loadable(list_checkpoints(folder))
    if epoch is not None and (best is None or epoch[1]["global_step"] >= best[1]["global_step"]):
        best = epoch
    return best


def _remove(paths: list[Path]) -> list[Path]:
    for path in paths:
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
    return paths


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` epoch checkpoints; returns the deleted paths."""
    return _remove(list_checkpoints(folder)[:-keep] if keep > 0 else [])


def save_epoch_checkpoint(snapshot: Mapping[str, Any], folder: Path, epoch: int, keep: int) -> Path:
    """Atomically write folder/epoch_XXX.pt, keep only the newest `keep`, and drop the
    mid-epoch checkpoints it supersedes."""
    path = save_checkpoint(epoch_checkpoint(folder, epoch), snapshot)
    prune_checkpoints(folder, keep)
    _remove(list_step_checkpoints(folder))
    return path


def save_step_checkpoint(snapshot: Mapping[str, Any], folder: Path) -> Path:
    """Atomically write folder/step_XXXXXXX.pt and keep the newest two mid-epoch ones."""
    path = save_checkpoint(step_checkpoint(folder, snapshot["global_step"]), snapshot)
    _remove(list_step_checkpoints(folder)[:-STEP_CHECKPOINTS_KEPT])
    return path


def build_or_resume(checkpoint_dir: Path, **build_kwargs: Any) -> TrainingState:
    """build_training(**build_kwargs), then restore the newest valid checkpoint if any.

    Raises:
        CheckpointError: if that checkpoint is of another format or model shape.
    """
    state = build_training(**build_kwargs)
    found = load_newest_valid(checkpoint_dir)
    if found is not None:
        path, checkpoint = found
        state.restore(checkpoint, str(path))
        log.info("resuming from %s (epoch %d, step %d)", path, state.epoch, state.global_step)
    return state


def rewind(state: TrainingState, checkpoint_dir: Path) -> str:
    """Put a dirty state back to its newest valid checkpoint (or its initial weights).

    Returns:
        what it was restored from, for the log.
    """
    found = load_newest_valid(checkpoint_dir)
    if found is not None:
        state.restore(found[1], str(found[0]))
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


def epoch_batch_source(
    dataset: Dataset,
    epoch: int,
    *,
    loader: Literal["auto", "device", "dataloader"],
    device: torch.device | str,
    batch_size: int,
    seed: int,
    random_flip: bool,
    num_workers: int,
    start_batch: int = 0,
) -> Iterator[torch.Tensor]:
    """An epoch's batches, device-resident or through a DataLoader (identical either way).

    auto keeps an in-memory dataset (CIFAR-10) on the training device when it takes at most a
    quarter of its free memory, and reads anything else (image folders) with a DataLoader
    whose workers persist across epochs (shared_epoch_loader); either way the batches are
    normalised and flipped on the device.

    Raises:
        ValueError: for loader="device" with a dataset that is not in memory.
    """
    device = torch.device(device)
    in_memory = isinstance(dataset, TensorImageDataset)
    if loader == "device" and not in_memory:
        raise ValueError("data.loader=device needs an in-memory dataset (cifar10)")
    if in_memory and (
        loader == "device" or (loader == "auto" and fits_on(device, dataset.images.nbytes))
    ):
        return device_epoch_batches(
            dataset.on(device),
            batch_size,
            seed=seed,
            epoch=epoch,
            random_flip=random_flip,
            start_batch=start_batch,
        )
    loader_for_run = shared_epoch_loader(  # kept across epochs: its workers persist
        dataset,
        batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        seed=seed,
    )
    return loader_for_run.epoch(
        epoch, random_flip=random_flip, start_batch=start_batch, device=device
    )


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
    max_bad_steps: int | None = None,
    checkpoint_every: int = 0,
    checkpoint_dir: Path | None = None,
    settings: Mapping[str, Any] | None = None,
    loader: Literal["auto", "device", "dataloader"] = "auto",
    compile: bool = False,
    read_every: int = 1,
) -> dict[str, float]:
    """Train epoch number `epoch` (from 1) on device, from batch state.epoch_step on.

    Every `checkpoint_every` steps a CPU snapshot goes to checkpoint_dir/step_XXXXXXX.pt on a
    background thread; each write must finish by the end of the next step, so a crash loses
    at most checkpoint_every steps.

    Args:
        on_step: called with (global step after the step, step metrics) for every step, at
            the reads (see train_epoch).
        read_every: steps between reads of the step metrics from the device (see
            train_epoch); on a GPU, more than 1 keeps steps from waiting for it.
        max_bad_steps: see train_epoch.
        settings: stored in the mid-epoch checkpoints.
        loader: where batches come from (see epoch_batch_source).
        compile: torch.compile the network (in place, once; state dicts are unchanged).

    On CUDA the model and batches use the channels-last memory format.

    Returns:
        train_epoch's metrics plus "epoch", "global_step" and "steps_per_epoch".
    """
    state.to(device)
    channels_last = torch.device(device).type == "cuda"
    if channels_last:
        state.diffusion.to(memory_format=torch.channels_last)
    if compile and not state.compiled:
        state.diffusion.eps_model.compile()
        state.compiled = True
    state.dirty = True
    writer = CheckpointWriter() if checkpoint_every and checkpoint_dir is not None else None
    first_step = state.global_step

    def after_step() -> None:
        state.global_step += 1
        state.epoch_step += 1
        if writer is not None:
            writer.wait()  # the previous write overlapped this step; it must be done now
            if state.global_step % checkpoint_every == 0:
                snapshot = state.snapshot(settings)
                writer.submit(lambda: save_step_checkpoint(snapshot, Path(checkpoint_dir)))

    def step_metrics(index: int, metrics: dict[str, float]) -> None:
        if on_step is not None:
            on_step(first_step + index + 1, metrics)

    batches = epoch_batch_source(
        dataset,
        epoch,
        loader=loader,
        device=device,
        batch_size=batch_size,
        seed=seed,
        random_flip=random_flip,
        num_workers=num_workers,
        start_batch=state.epoch_step,
    )
    if channels_last:
        batches = (x.contiguous(memory_format=torch.channels_last) for x in batches)
    try:
        metrics = train_epoch(
            state.diffusion,
            state.optimizer,
            batches,
            device=device,
            scheduler=state.scheduler,
            ema=state.ema,
            grad_clip=grad_clip,
            on_step=step_metrics,
            after_step=after_step,
            read_every=read_every,
            max_bad_steps=max_bad_steps,
            precision=state.precision,
            scaler=state.scaler,
        )
    finally:
        if writer is not None:
            writer.close()
    state.epoch, state.epoch_step, state.dirty = epoch, 0, False
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
    compile: bool = False,
    clip_denoised: bool = True,
    eta: float = 0.0,
) -> torch.Tensor:
    """Sample a batch from fixed noise: the same seed gives the same noise every epoch.

    x_T comes from a CPU generator, so it is the same on any device, and the global RNG (which
    training draws from) is left untouched; the ancestral sampler's per-step noise comes from
    a generator on the device seeded from it. The network runs in the run's precision.

    Args:
        compile: run the sampler's steps through torch.compile (CUDA graphs on CUDA); worth
            it for the 1000-step ancestral sampler, where the first call's compile pays back.
        clip_denoised: clip each step's x0 estimate to [-1, 1] (see DiffusionModel.predict_x0).
        eta: DDIM's share of fresh noise per step (0 = deterministic; see sample_ddim).

    Returns:
        (num, C, H, W) samples in [-1, 1], on the CPU.
    """
    state.to(device)
    model = state.ema.module if use_ema else state.diffusion
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with autocast(torch.device(device).type, state.precision):
            options = {"generator": generator, "compile": compile, "clip_denoised": clip_denoised}
            if sampler == "ddim":
                x = model.sample_ddim(num, image_shape, steps, eta=eta, **options)
            else:
                x = model.sample(num, image_shape, **options)
    finally:
        model.train(was_training)
    return to_cpu(x.float())
