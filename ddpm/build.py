"""What a run trains, built from its config: the network, the DiffusionModel around it, and
the whole training state (optimizer, lr schedule, EMA), fresh or resumed from the run folder.

A run is then: build_or_resume -> (Trainer.epoch -> save_epoch_checkpoint -> draw_samples)*,
which a notebook, a script or an orchestrator drives alike.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ddpm.config import (
    Config,
    DiffusionConfig,
    ModelConfig,
)
from ddpm.datasets import sigma_data_of
from ddpm.ddpm_unet import DDPMUNet
from ddpm.diffusion import DiffusionModel
from ddpm.edm import SIGMA_DATA, EDMParams
from ddpm.run_dir import RunDir, load_newest_valid
from ddpm.training import (
    EMA,
    TrainingState,
    build_lr_scheduler,
    build_optimizer,
    power_emas,
    run_warmup_steps,
    seed_everything,
)
from ddpm.unet import UNet

log = logging.getLogger(__name__)


def build_network(model: ModelConfig, image_size: int) -> nn.Module:
    """model.arch's U-Net for images of image_size px, with torch's current random weights."""
    if model.arch == "ddpm":
        network = DDPMUNet(
            model.channels, model.channels, model.hidden_size, model.channel_mult,
            model.num_res_blocks, model.attention_resolutions, model.dropout, image_size,
        )  # fmt: skip
        network.enable_gradient_checkpointing(model.checkpointing)
    else:
        network = UNet(model.channels, model.channels, model.hidden_size)
    if model.augment_labels:
        network.enable_augment_labels()
    return network


def build_diffusion(
    model: ModelConfig, diffusion: DiffusionConfig, image_size: int = 32
) -> DiffusionModel:
    """The U-Net inside its DiffusionModel, on the CPU, with torch's current random weights."""
    return DiffusionModel(
        build_network(model, image_size),
        (diffusion.beta_start, diffusion.beta_end),
        diffusion.num_timesteps,
        schedule=diffusion.schedule,
        prediction=diffusion.prediction,
        loss_weighting=diffusion.loss_weighting,
        min_snr_gamma=diffusion.min_snr_gamma,
        edm=EDMParams(
            diffusion.sigma_data or SIGMA_DATA,  # resolved by the run (with_sigma_data)
            diffusion.p_mean,
            diffusion.p_std,
        )
        if diffusion.formulation == "edm"
        else None,
    )


def with_sigma_data(config: Config, dataset: Dataset) -> Config:
    """config with diffusion.sigma_data measured on the training images where an edm run
    leaves it unset (ddpm.datasets.sigma_data_of), so the model, its checkpoints' architecture
    record and a resumed run all hold the value; config itself otherwise."""
    diffusion = config.diffusion
    if diffusion.formulation != "edm" or diffusion.sigma_data is not None:
        return config
    measured = sigma_data_of(dataset)
    log.info("diffusion.sigma_data %.4f, measured on the training images", measured)
    resolved = dataclasses.replace(diffusion, sigma_data=measured)
    return dataclasses.replace(config, diffusion=resolved)


def build_training(
    config: Config, total_steps: int, settings: Mapping[str, Any] | None = None
) -> TrainingState:
    """Build a fresh run's U-Net, DiffusionModel, optimizer, lr schedule and EMA on the CPU.

    The weights come from config.train.seed, so two builds of one config are identical.

    Args:
        config: model, diffusion, optim and train (seed, EMA decay, precision, device for
            fused kernels and the fp16 scaler) are read.
        total_steps: the run's steps; the lr warm-up is cut to a tenth of them where longer
            (see run_warmup_steps) and a cosine schedule ends there.
        settings: stored in every snapshot of the state (the resolved settings, for people).
    """
    model, optim, train = config.model, config.optim, config.train
    seed_everything(train.seed, train.deterministic)
    diffusion = build_diffusion(model, config.diffusion, config.data.image_size)
    if model.init_from is not None:
        start_from(diffusion, config)
    opt = build_optimizer(diffusion.parameters(), optim, train.fused)
    # Decided once, when the run starts: a resumed run restores the schedule from its
    # checkpoint (see LRSchedule), so raising the epochs later keeps its warm-up.
    warmup = run_warmup_steps(optim.warmup_steps, total_steps)
    state = TrainingState(
        diffusion,
        opt,
        scheduler=build_lr_scheduler(opt, warmup, total_steps, optim.schedule),
        ema=EMA(diffusion, train.ema_decay),
        profiles=power_emas(diffusion, train.ema_snapshots),
        ema_snapshot_every=max(1, round(total_steps / train.ema_snapshots))
        if train.ema_snapshots
        else 0,
        grad_clip=optim.grad_clip,
        precision=train.precision,
        settings=dict(settings or {}),
        architecture={
            "model": {k: v for k, v in dataclasses.asdict(model).items() if k != "init_from"},
            "diffusion": dataclasses.asdict(config.diffusion),
            "image_shape": list(config.image_shape),
        },
    )
    if train.precision == "fp16":
        state.scaler = torch.amp.GradScaler(torch.device(train.device).type)
    state.initial = state.snapshot()
    return state


def start_from(diffusion: DiffusionModel, config: Config) -> None:
    """Load the network's weights from the diffusers folder config.model.init_from.

    Raises:
        FormatError: naming the folder and the first setting it does not match.
    """
    from ddpm.diffusers_format import check_start, read_folder

    folder = config.model.init_from
    model, found, size, weights = read_folder(folder)
    check_start(folder, (model, found, size), (config.model, config.diffusion,
                config.data.image_size))  # fmt: skip
    diffusion.eps_model.load_state_dict(weights)
    log.info("the network starts from %s", folder)


def build_or_resume(
    config: Config, total_steps: int, run: RunDir, settings: Mapping[str, Any] | None = None
) -> TrainingState:
    """build_training, then restore the run's newest valid checkpoint if any.

    Raises:
        CheckpointError: if that checkpoint is of another format or model shape.
    """
    state = build_training(config, total_steps, settings)
    found = load_newest_valid(run)
    if found is not None:
        path, checkpoint = found
        state.restore(checkpoint, str(path))
        log.info("resuming from %s (epoch %d, step %d)", path, state.epoch, state.global_step)
    return state


def rewind(state: TrainingState, run: RunDir) -> str:
    """Put a dirty state back to the run's newest valid checkpoint (or its initial weights).

    Returns:
        what it was restored from, for the log.
    """
    found = load_newest_valid(run)
    if found is not None:
        state.restore(found[1], str(found[0]))
        return str(found[0])
    state.restore(state.initial)
    return "the initial weights"
