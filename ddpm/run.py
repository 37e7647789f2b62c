"""One training run, as a workflow composes it from its config:

    build_or_resume -> (Trainer.epoch -> save_epoch_checkpoint -> draw_samples)*

A notebook, a script or an orchestrator drives it alike.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm.checkpoint import to_cpu
from ddpm.checkpoint_files import load_newest_valid
from ddpm.config import (
    Config,
    DiffusionConfig,
    ModelConfig,
    Precision,
    SampleConfig,
)
from ddpm.data import TrainingData, load_dataset, locate_dataset
from ddpm.ddpm_unet import DDPMUNet
from ddpm.diffusion import DiffusionModel, Generators
from ddpm.distributed import Group, collectives
from ddpm.run_dir import RunDir
from ddpm.samplers import make_sampler
from ddpm.schedules import named_betas, schedule_constants
from ddpm.trainer import EpochResult, Trainer
from ddpm.training import (
    TrainingState,
    autocast,
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    run_warmup_steps,
    seed_everything,
)
from ddpm.unet import UNet

log = logging.getLogger(__name__)


def build_network(model: ModelConfig, image_size: int) -> nn.Module:
    """model.arch's U-Net for images of image_size px, with torch's current random weights."""
    if model.arch == "ddpm":
        return DDPMUNet(
            model.channels, model.channels, model.hidden_size, model.channel_mult,
            model.num_res_blocks, model.attention_resolutions, model.dropout, image_size,
        )  # fmt: skip
    return UNet(model.channels, model.channels, model.hidden_size)


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
    )


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
    opt = build_optimizer(
        diffusion.parameters(), optim.name, optim.lr, optim.momentum, optim.weight_decay,
        train.fused,
    )  # fmt: skip
    # Decided once, when the run starts: a resumed run restores the schedule from its
    # checkpoint (see LRSchedule), so raising the epochs later keeps its warm-up.
    warmup = run_warmup_steps(optim.warmup_steps, total_steps)
    state = TrainingState(
        diffusion,
        opt,
        scheduler=build_lr_scheduler(opt, warmup, total_steps, optim.schedule),
        ema=build_ema(diffusion, train.ema_decay),
        grad_clip=optim.grad_clip,
        precision=train.precision,
        settings=dict(settings or {}),
        architecture={
            "model": dataclasses.asdict(model),
            "diffusion": dataclasses.asdict(config.diffusion),
            "image_shape": list(config.image_shape),
        },
    )
    if train.precision == "fp16":
        state.scaler = torch.amp.GradScaler(torch.device(train.device).type)
    state.initial = state.snapshot()
    return state


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


def share_start(group: Group, state: TrainingState, data_path: str) -> None:
    """(rank 0) Send the other ranks what they start from: where the data is, and the state
    built or resumed here (EMA aside: it is rank 0's alone), RNGs included."""
    start = {"data_path": data_path, "state": {**state.snapshot(), "ema": None}}
    if state.device.type == "cuda":  # training draws on each rank's own device
        start["device_rng"] = torch.cuda.get_rng_state(state.device)
    group.broadcast(start)


def train_rank(group: Group, config: Config) -> EpochResult | None:
    """Train as rank > 0 of a data-parallel group (ddpm.distributed): take rank 0's start
    (share_start), load this rank's slices of the data (from rank 0's path, or fetched here
    when this machine does not have it), then run the same epochs as rank 0, until they are
    done or rank 0 stops the run. No files, no tracking: those are rank 0's.

    Raises:
        RankFailed: if another rank is gone.
        TrainingDiverged: as on rank 0, at the same step (the loss is the global one).
    """
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, device=group.device(config.train.device))
    )
    with collectives(group):
        start = group.broadcast(None)
    path = Path(start["data_path"])
    if not path.exists():
        path = locate_dataset(config.data)
    data = TrainingData(load_dataset(config, path), config, group.rank, group.world_size)
    state = build_training(config, data.steps_per_epoch * config.train.epochs)
    state.ema = None
    state.restore(start["state"])
    if "device_rng" in start:
        torch.cuda.set_rng_state(start["device_rng"], torch.device(config.train.device))
    try:
        return Trainer(state, data, config.train, group=group).fit()
    finally:
        data.close()


def draw_samples(
    state: TrainingState,
    sample: SampleConfig,
    image_shape: tuple[int, int, int],
    seed: int,
    progress: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Sample a batch from fixed noise, on the state's device: the same seed gives the same
    noise every epoch.

    x_T comes from a CPU generator, so it is the same on any device, and the global RNG (which
    training draws from) is left untouched; the per-step noise comes from a generator on the
    device seeded from it. The network runs in the run's precision.

    Args:
        sample: num, sampler (ddpm, or ddim / dpmpp_2m with steps), use_ema, clip_denoised and
            compile (the sampler's steps through torch.compile; CUDA graphs on CUDA).
        image_shape: (C, H, W).
        progress: called after each sampler step (nothing is read from the device).

    Returns:
        (sample.num, C, H, W) samples in [-1, 1], on the CPU.
    """
    model = state.ema.module if sample.use_ema and state.ema is not None else state.diffusion
    generator = torch.Generator().manual_seed(seed)
    x = run_sampler(model, sample, sample.num, image_shape, generator, state.precision, progress)
    return to_cpu(x.float())


def run_sampler(
    model: DiffusionModel,
    sample: SampleConfig,
    num: int,
    image_shape: tuple[int, int, int],
    generator: Generators,
    precision: Precision = "fp32",
    progress: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Draw `num` images with sample's sampler (ddpm, or ddim / dpmpp_2m with steps), in eval
    mode (the model's mode is put back after) and in `precision`, on the model's device.

    Args:
        generator: the noise's source, one for the batch or one per image (see
            DiffusionModel._noise).

    Returns:
        (num, C, H, W) float samples in [-1, 1] on the model's device.
    """
    was_training = model.training
    model.eval()
    options = {
        "sampler": sample.sampler,
        "steps": sample.steps,
        "eta": sample.eta,
        "generator": generator,
        "compile": sample.compile,
        "clip_denoised": sample.clip_denoised,
        "progress": progress,
    }
    try:
        with autocast(model.betas.device.type, precision):
            return model.sample(num, image_shape, **options)
    finally:
        model.train(was_training)


def network_calls(diffusion: DiffusionConfig, sample: SampleConfig) -> int:
    """How many times sample's sampler calls the network for one batch (all T for ddpm)."""
    betas = named_betas(
        diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end
    )
    abar = schedule_constants(betas)["alphas_cumprod"]
    sampler = make_sampler(sample.sampler, abar, diffusion.prediction, steps=sample.steps)
    return len(sampler.timesteps)
