"""A DDPM (Ho et al. 2020) in plain PyTorch: network, diffusion, data, training, checkpoints.

Nothing here imports prefect, wandb or the project's settings: functions take plain arguments.
"""

from ddpm.checkpoint import (
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from ddpm.data import (
    DatasetError,
    EpochLoader,
    ImageFolderDataset,
    TensorImageDataset,
    denormalize,
    download_cifar10,
    epoch_batches,
    load_cifar10,
    normalize,
    shared_epoch_loader,
    subset_indices,
)
from ddpm.diffusion import DiffusionModel, linear_beta_schedule
from ddpm.images import save_grid
from ddpm.training import (
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    resolve_device,
    seed_everything,
    train_epoch,
    train_step,
)
from ddpm.unet import UNet

__all__ = [
    "DatasetError",
    "DiffusionModel",
    "EpochLoader",
    "ImageFolderDataset",
    "TensorImageDataset",
    "UNet",
    "build_ema",
    "build_lr_scheduler",
    "build_optimizer",
    "denormalize",
    "download_cifar10",
    "epoch_batches",
    "linear_beta_schedule",
    "load_checkpoint",
    "load_cifar10",
    "normalize",
    "resolve_device",
    "restore_training_state",
    "save_checkpoint",
    "save_grid",
    "seed_everything",
    "shared_epoch_loader",
    "subset_indices",
    "train_epoch",
    "train_step",
    "training_state",
]
