"""A DDPM (Ho et al. 2020) in plain PyTorch: network, diffusion, data, training, checkpoints.

Nothing here imports prefect, wandb or the project's settings: functions take the plain
config objects of ddpm.config. Names are imported on first use, so `import ddpm.config` (which
the settings need) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ddpm.config": [
        "Config", "DataConfig", "DiffusionConfig", "ModelConfig", "OptimConfig",
        "SampleConfig", "TrainConfig",
    ],
    "ddpm.checkpoint": ["CheckpointError", "load_checkpoint", "save_checkpoint"],
    "ddpm.run_dir": ["RunDir", "load_newest_valid", "save_epoch_checkpoint"],
    "ddpm.errors": ["DatasetError"],
    "ddpm.cifar10": ["download_cifar10", "load_cifar10"],
    "ddpm.image_folders": ["ImageFolderDataset"],
    "ddpm.datasets": ["TensorImageDataset", "load_dataset", "locate_dataset"],
    "ddpm.batches": ["EpochLoader", "TrainingData", "denormalize", "normalize"],
    "ddpm.diffusion": ["DiffusionModel"],
    "ddpm.samplers": ["Ancestral", "DDIM", "DPMSolverPP2M", "make_sampler"],
    "ddpm.schedules": ["linear_beta_schedule", "named_betas", "schedule_constants"],
    "ddpm.images": ["save_grid"],
    "ddpm.build": ["build_or_resume", "build_training", "rewind"],
    "ddpm.generate": ["draw_samples", "load_trained_model"],
    "ddpm.trainer": ["EpochResult", "Hooks", "StepMetrics", "Trainer", "train_step"],
    "ddpm.training": [
        "EMA", "TrainingState", "build_lr_scheduler", "build_optimizer", "resolve_device",
        "seed_everything",
    ],
    "ddpm.unet": ["UNet"],
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
