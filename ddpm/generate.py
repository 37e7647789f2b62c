"""Images from a model: a training run's grid (draw_samples) and, from a trained run, its
network from a checkpoint and its images from noise seeded per image, in the aligned batches
that ddpm.images.ImageFiles writes as numbered PNG files (which an interrupted generation
resumes).

Image i is drawn from noise seeded by (seed, i) alone (image_seed). Batches cover the indices
[k B, (k + 1) B), the last one cut at the number asked for, so no image is drawn that is not
kept, and a resumed folder draws the same batches again. The batch an image shares changes only
the rounding (at most one grey level): 100 images are the first 100 of 200 up to that, and
exactly where they share full batches (same batch size and device).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm.batches import denormalize
from ddpm.build import build_diffusion
from ddpm.checkpoint import CheckpointError, check_compatible, load_checkpoint, to_cpu
from ddpm.config import DiffusionConfig, ModelConfig, Precision, SampleConfig
from ddpm.diffusion import DiffusionModel
from ddpm.edm import SIGMA_MAX, SIGMA_MIN
from ddpm.errors import UserError, first_line
from ddpm.images import aligned_batches
from ddpm.noise import Generators
from ddpm.run_dir import RunDir, load_newest_valid
from ddpm.samplers import make_sampler
from ddpm.schedules import named_betas, schedule_constants
from ddpm.sigma_samplers import SIGMA_SAMPLERS, make_sigma_sampler
from ddpm.training import TrainingState, autocast


@dataclass(frozen=True)
class TrainedModel:
    """A run's network, ready to sample, and where it came from."""

    diffusion: DiffusionModel  # the chosen weights, in eval mode, on the CPU
    model: ModelConfig  # what builds its network
    diffusion_config: DiffusionConfig  # and its schedule and prediction
    image_shape: tuple[int, int, int]  # (C, H, W)
    checkpoint: Path
    epoch: int  # epochs completed
    global_step: int
    ema: bool  # whether these are the EMA weights
    settings: dict[str, Any]  # the run's resolved settings, as the checkpoint recorded them


def architecture(
    state: Mapping[str, Any], source: str
) -> tuple[ModelConfig, DiffusionConfig, tuple[int, int, int]]:
    """What builds a checkpoint's network: its `architecture` record, or, in checkpoints
    written before it was recorded, the model, diffusion and data settings saved with it.

    Raises:
        CheckpointError: naming source, if it records neither.
    """
    record = state.get("architecture")
    if record:
        shape = tuple(record["image_shape"])
        diffusion = DiffusionConfig.from_record(record["diffusion"])
        return ModelConfig(**record["model"]), diffusion, shape
    settings = state.get("settings") or {}
    try:
        model = ModelConfig(**settings["model"])
        diffusion = DiffusionConfig.from_record(settings["diffusion"])
        size = int(settings["data"]["image_size"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(
            f"{source} records neither its architecture nor the settings it was trained with"
        ) from err
    return model, diffusion, (model.channels, size, size)


def find_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """A run folder's newest valid checkpoint (see load_newest_valid), or a checkpoint file,
    with its state.

    Raises:
        CheckpointError: naming path, if it holds no usable checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        found = load_newest_valid(RunDir(path))
        if found is None:
            raise CheckpointError(f"{path}: no usable checkpoint in {RunDir(path).checkpoints}")
        return found
    if not path.is_file():
        raise CheckpointError(f"{path}: no such run folder or checkpoint file")
    try:
        return path, load_checkpoint(path)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(err)})") from err


def load_trained_model(path: Path, use_ema: bool = True) -> TrainedModel:
    """The network of a run folder (its newest valid checkpoint), of a checkpoint file, or of
    a diffusers folder (as google/ddpm-cifar10-32 or an export; its weights as they are).

    Args:
        path: a run folder or a checkpoint file.
        use_ema: load the EMA weights (what the DDPM paper samples from); else the trained ones.

    Raises:
        CheckpointError: naming the file, if there is none, it is unreadable, of another
            format or model, or holds no EMA weights when they are asked for.
    """
    if (Path(path) / "model_index.json").is_file() or (Path(path) / "config.json").is_file():
        return _diffusers_model(Path(path))
    source, state = find_checkpoint(path)
    try:
        model, diffusion_config, image_shape = architecture(state, str(source))
        diffusion = build_diffusion(model, diffusion_config, image_shape[-1])
        check_compatible(state, diffusion, str(source))
        weights = state["model"]
        if use_ema:
            if not state.get("ema"):
                raise CheckpointError(f"{source} holds no EMA weights; sample without the EMA")
            # AveragedModel's state dict: the averaged copy under `module.`, and n_averaged.
            weights = {k[7:]: v for k, v in state["ema"].items() if k[:7] == "module."}
        diffusion.load_state_dict(weights)
    except (KeyError, AttributeError, TypeError, ValueError, RuntimeError) as err:
        if isinstance(err, UserError):
            raise
        # A file that loads but is not what a run writes (damaged where no checksum said so).
        raise CheckpointError(
            f"{source}: not a checkpoint of this project ({type(err).__name__}: "
            f"{first_line(err)[:200]})"
        ) from err
    diffusion.eval().requires_grad_(False)
    return TrainedModel(
        diffusion=diffusion,
        model=model,
        diffusion_config=diffusion_config,
        image_shape=image_shape,  # type: ignore[arg-type]
        checkpoint=source,
        epoch=int(state["epoch"]),
        global_step=int(state["global_step"]),
        ema=use_ema,
        settings=dict(state.get("settings") or {}),
    )


def _diffusers_model(folder: Path) -> TrainedModel:
    """The network of a diffusers folder (ddpm.diffusers_format.read_folder), untrained here:
    epoch and step 0, the run's default settings."""
    from ddpm.diffusers_format import read_folder

    model, diffusion_config, size, weights = read_folder(folder)
    diffusion = build_diffusion(model, diffusion_config, size)
    diffusion.eps_model.load_state_dict(weights)
    diffusion.eval().requires_grad_(False)
    shape = (model.channels, size, size)
    return TrainedModel(diffusion, model, diffusion_config, shape, folder, 0, 0, False, {})


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s noise: 63 bits of SHA-256 over (seed, index), so no two
    images of any seeds share a generator stream."""
    digest = hashlib.sha256(f"ddpm-image:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] -> uint8 in [0, 255], rounded as torchvision's save_image
    rounds, on the CPU."""
    return denormalize(x.float()).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).cpu()


@torch.no_grad()
def generate(
    diffusion: DiffusionModel,
    indices: range,
    image_shape: tuple[int, int, int],
    sample: SampleConfig,
    seed: int,
    precision: Precision = "fp32",
    progress: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Draw the images `indices`, each from noise of its own (image_seed(seed, i)), in one
    batch on the model's device.

    Args:
        diffusion: the network, on the device it should run on.
        indices: which images, e.g. one of aligned_batches.
        image_shape: (C, H, W).
        sample: sampler (ddpm, or ddim / dpmpp_2m with steps; eta for ddim), clip_denoised,
            compile.
        precision: autocast for the network: fp32, bf16 or fp16.
        progress: called after each sampler step.

    Returns:
        (len(indices), C, H, W) uint8 images on the CPU.
    """
    generators = [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]
    x = run_sampler(diffusion, sample, len(indices), image_shape, generators, precision, progress)
    return to_uint8(x)


def sample_set(
    diffusion: DiffusionModel,
    num: int,
    image_shape: tuple[int, int, int],
    sample: SampleConfig,
    seed: int,
    batch_size: int,
    precision: Precision = "fp32",
    progress: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Images 0 .. num-1 in memory, in aligned batches of batch_size: the images that
    ImageFiles would hold after drawing them with these options.

    Args:
        progress: called after each sampler step of each batch.

    Returns:
        (num, C, H, W) uint8 on the CPU.
    """
    batches = [
        generate(diffusion, indices, image_shape, sample, seed, precision, progress)
        for indices in aligned_batches(num, batch_size)
    ]
    return torch.cat(batches)[:num]


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
    if sample.sampler in SIGMA_SAMPLERS:
        options.update(
            rho=sample.rho, sigma_min=sample.sigma_min, sigma_max=sample.sigma_max,
            s_churn=sample.s_churn, s_tmin=sample.s_tmin,
            s_tmax=math.inf if sample.s_tmax is None else sample.s_tmax,
            s_noise=sample.s_noise,
        )  # fmt: skip
    try:
        with autocast(model.betas.device.type, precision):
            return model.sample(num, image_shape, **options)
    finally:
        model.train(was_training)


def network_calls(diffusion: DiffusionConfig, sample: SampleConfig) -> int:
    """How many times sample's sampler calls the network for one batch (all T for ddpm)."""
    if sample.sampler in SIGMA_SAMPLERS:  # the range changes no count
        return make_sigma_sampler(sample.sampler, sample.steps, SIGMA_MIN, SIGMA_MAX).network_calls
    betas = named_betas(
        diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end
    )
    abar = schedule_constants(betas)["alphas_cumprod"]
    sampler = make_sampler(sample.sampler, abar, diffusion.prediction, steps=sample.steps)
    return len(sampler.timesteps)
