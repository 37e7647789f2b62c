"""One training run, as a workflow composes it from its config:

    build_or_resume -> (run_epoch -> save_epoch_checkpoint -> draw_samples)*

A notebook, a script or an orchestrator drives it alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm.checkpoint import CheckpointWriter, to_cpu
from ddpm.checkpoint_files import load_newest_valid, save_step_checkpoint
from ddpm.config import (
    Config,
    DiffusionConfig,
    ModelConfig,
    Precision,
    SampleConfig,
    TrainConfig,
)
from ddpm.data import TrainingData, load_dataset, locate_dataset
from ddpm.ddpm_unet import DDPMUNet
from ddpm.diffusion import DiffusionModel, Generators
from ddpm.distributed import Group, RankFailed, collectives, set_training_rng
from ddpm.run_dir import RunDir
from ddpm.samplers import make_sampler
from ddpm.schedules import named_betas, schedule_constants
from ddpm.training import (
    EpochResult,
    StepCallback,
    TrainingDiverged,
    TrainingState,
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


def run_epoch(
    state: TrainingState,
    data: TrainingData,
    train: TrainConfig,
    *,
    on_step: StepCallback | None = None,
    after_step: Callable[[], None] | None = None,
    run: RunDir | None = None,
    stop: Callable[[], bool] | None = None,
    group: Group | None = None,
) -> EpochResult:
    """Train the state's next epoch on train.device, from batch state.epoch_step on.

    Every train.checkpoint_every steps (with a run folder) a CPU snapshot goes to a mid-epoch
    checkpoint on a background thread; each write must finish by the end of the next step, so
    a crash loses at most checkpoint_every steps. The step metrics are read from the device
    every train.log_every steps; train.compile compiles the network (in place, once; state
    dicts are unchanged). On CUDA, uncompiled, the model and batches use the channels-last
    memory format; compiled, they stay contiguous and inductor picks the convolutions' layouts
    (channels-last parameters make its backward fail, pytorch/pytorch#171622).

    Args:
        on_step: called with (the run's step number, its metrics) for every step, at the
            reads (see train_epoch).
        after_step: called after each step is queued, with nothing read (a progress bar).
        run: where mid-epoch checkpoints go.
        stop: asked before each step (see train_epoch). When it ends the epoch early, the
            state after the last step taken goes to a mid-epoch checkpoint (with a run
            folder) before this returns, so a re-run resumes with no step lost or repeated;
            the result's `stopped` is set and the state stays mid-epoch.
        group: train data-parallel with this group (ddpm.distributed): rank 0 first tells the
            followers to train this epoch, and its stop requests reach every rank.

    Raises:
        RankFailed: if a rank of the group died or went silent.
    """
    state.to(train.device)
    channels_last = state.device.type == "cuda" and not train.compile
    if channels_last:
        state.diffusion.to(memory_format=torch.channels_last)
    if train.compile and not state.compiled:
        state.diffusion.eps_model.compile()
        state.compiled = True
    state.dirty = True
    writer = CheckpointWriter() if train.checkpoint_every and run is not None else None

    def bookkeeping() -> None:
        if writer is not None:
            writer.wait()  # the previous write overlapped this step; it must be done now
            if state.global_step % train.checkpoint_every == 0:
                snapshot = state.snapshot()
                writer.submit(lambda: save_step_checkpoint(snapshot, run))
        if after_step is not None:
            after_step()

    batches = data.epoch(state.epoch + 1, start_batch=state.epoch_step)
    if channels_last:
        batches = (x.contiguous(memory_format=torch.channels_last) for x in batches)
    shard = None
    try:
        with collectives(group) if group is not None else contextlib.nullcontext():
            if group is not None:
                if group.leader:
                    group.lead_epoch(state.snapshot, state.epoch + 1, state.epoch_step)
                shard, stop = group.shard(state.diffusion), _agreed(group, stop)
            result = train_epoch(
                state,
                batches,
                on_step=on_step,
                after_step=bookkeeping,
                read_every=train.log_every,
                max_bad_steps=train.max_bad_steps,
                stop=stop,
                shard=shard,
            )
    except BaseException as err:
        if group is not None and group.leader:
            group.in_sync = False  # the followers' state is not rank 0's now
            if shard is not None and not isinstance(err, (RankFailed, TrainingDiverged)):
                # Rank 0 failed between steps (the followers, waiting for its next stop flag,
                # would hang): tell them the epoch is over.
                with contextlib.suppress(Exception):
                    group.agree(True)
        raise
    finally:
        if writer is not None:
            writer.close()
    if not result.stopped:
        state.epoch, state.epoch_step, state.dirty = result.epoch, 0, False
    elif run is not None:
        save_step_checkpoint(state.snapshot(), run)
        state.dirty = False  # the state is the checkpoint's
    return result


def _agreed(group: Group, stop: Callable[[], bool] | None) -> Callable[[], bool]:
    """A stop check every rank answers alike, before each step: rank 0's answer."""
    if group.leader:
        return lambda: group.agree(stop is not None and stop())
    return lambda: group.agree(False)


def follow(group: Group, config: Config) -> None:
    """Train as a follower of rank 0 until it ends the run (ddpm.distributed).

    Each command of rank 0 names an epoch, where it starts, where the data is and rank 0's
    RNG state; after a start, a resume or a failed epoch, the whole state follows. The data is
    loaded at the first command (from rank 0's path, or fetched here when this machine does
    not have it); the EMA is rank 0's alone. A divergence fails rank 0 too, which decides.

    Raises:
        RankFailed: if rank 0 or another rank is gone.
    """
    config = group.place(config)
    train = config.train
    state: TrainingState | None = None
    data: TrainingData | None = None
    while (command := group.receive())["kind"] == "epoch":
        if data is None:
            path = command["data_path"]
            if path is None or not Path(path).exists():
                path = locate_dataset(config.data)
            data = TrainingData(load_dataset(config, path), config)
        if state is None:
            state = build_training(config, data.steps_per_epoch * train.epochs)
            state.ema = None
        if command["sync"]:
            state.restore(group.broadcast(None))
        state.epoch, state.epoch_step = command["epoch"] - 1, command["start"]
        set_training_rng(command["rng"])
        with contextlib.suppress(TrainingDiverged):
            run_epoch(state, data, train, group=group)
    if data is not None:
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
