"""The diffusers configs of a trained run, both ways: the JSON that diffusers' UNet2DModel,
DDPMScheduler and the assignment network's custom component are built from, written from the
project's ModelConfig and DiffusionConfig, and read back into them (ddpm.diffusers_format
writes and reads the folders that hold them). JSON only; diffusers itself is not imported here.

- `model.arch=ddpm` is a `UNet2DModel` in the layout of the paper's CIFAR-10 model
  (google/ddpm-cifar10-32), every field written (PAPER_LAYOUT).
- the scheduler is `DDPMScheduler` with the run's betas, prediction and clipping and the
  ancestral step's variance (sigma_t^2 = beta_t: "fixed_large").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ddpm.config import DiffusionConfig, ModelConfig
from ddpm.errors import UserError

DIFFUSERS_VERSION = "0.42.0"  # the version the folders are written for and tested with
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}

# google/ddpm-cifar10-32's fields that fix the paper's layout; diffusers' defaults differ
# (flip_sin_to_cos, freq_shift, downsample_padding, norm_eps), so each is written.
PAPER_LAYOUT: dict[str, Any] = {
    "act_fn": "silu",
    "add_attention": True,
    "attention_head_dim": None,  # one head as wide as the block
    "attn_norm_num_groups": None,
    "center_input_sample": False,
    "class_embed_type": None,
    "downsample_padding": 0,  # pad right and bottom by one, as the reference code
    "downsample_type": "conv",
    "flip_sin_to_cos": False,  # sin then cos
    "freq_shift": 1,  # frequencies 10000^(-i / (C/2 - 1))
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "upsample_type": "conv",
}


class FormatError(UserError, ValueError):
    """A network, schedule or folder that the other side cannot express or read."""


def unet2d_config(model: ModelConfig, image_size: int) -> dict[str, Any]:
    """The UNet2DModel config of model.arch=ddpm's network: the paper's layout with the run's
    widths, blocks per level, attention sides and dropout."""
    levels = range(len(model.channel_mult))
    attends = [image_size >> i in model.attention_resolutions for i in levels]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        **PAPER_LAYOUT,
        "block_out_channels": [model.hidden_size * m for m in model.channel_mult],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "dropout": model.dropout,
        "in_channels": model.channels,
        "out_channels": model.channels,
        "layers_per_block": model.num_res_blocks,
        "sample_size": image_size,
    }


def model_from_unet2d(config: Mapping[str, Any], source: str) -> tuple[ModelConfig, int]:
    """The ModelConfig and image size of a UNet2DModel config in the paper's layout.

    Raises:
        FormatError: naming source and the field that is not the paper's layout.
    """
    for field, value in PAPER_LAYOUT.items():
        if field in config and config[field] != value and field != "attention_head_dim":
            raise FormatError(f"{source}: {field} is {config[field]!r}; the paper's is {value!r}")
    widths, down = list(config["block_out_channels"]), list(config["down_block_types"])
    head = config.get("attention_head_dim")
    attending = [w for w, d in zip(widths, down, strict=True) if "Attn" in d]
    if head is not None and any(head != w for w in attending):
        raise FormatError(f"{source}: attention_head_dim {head} is not one head per block")
    if config["in_channels"] != config["out_channels"] or widths[0] % 32:
        raise FormatError(f"{source}: in/out channels or widths are not the paper network's")
    if any(w % widths[0] for w in widths):
        raise FormatError(f"{source}: block_out_channels {widths} are not multiples of the first")
    size = config["sample_size"]
    size = size if isinstance(size, int) else size[0]
    model = ModelConfig(
        arch="ddpm", hidden_size=widths[0], channels=config["in_channels"],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=config["layers_per_block"],
        attention_resolutions=tuple(size >> i for i, d in enumerate(down) if "Attn" in d),
        dropout=float(config.get("dropout", 0.0)),
    )  # fmt: skip
    if unet2d_config(model, size)["up_block_types"] != list(config["up_block_types"]):
        raise FormatError(f"{source}: up_block_types do not mirror down_block_types")
    return model, size


def scheduler_config(diffusion: DiffusionConfig, clip_denoised: bool) -> dict[str, Any]:
    """DDPMScheduler's config that reproduces the project's ancestral sampler: the run's betas,
    T and prediction, x0 clipped to [-1, 1] where the run's samples are, sigma_t^2 = beta_t."""
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": diffusion.num_timesteps,
        "beta_schedule": SCHEDULES[diffusion.schedule],
        "beta_start": diffusion.beta_start,
        "beta_end": diffusion.beta_end,
        "trained_betas": None,
        "variance_type": "fixed_large",
        "clip_sample": clip_denoised,
        "clip_sample_range": 1.0,
        "prediction_type": PREDICTIONS[diffusion.prediction],
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def diffusion_from_scheduler(config: Mapping[str, Any], source: str) -> DiffusionConfig:
    """The DiffusionConfig of a DDPMScheduler config (the inverse of scheduler_config).

    Raises:
        FormatError: naming source, for a schedule or prediction this project does not train.
    """
    schedule = {v: k for k, v in SCHEDULES.items()}.get(config.get("beta_schedule", "linear"))
    prediction = {v: k for k, v in PREDICTIONS.items()}.get(
        config.get("prediction_type", "epsilon")
    )
    if schedule is None or prediction is None or config.get("trained_betas"):
        raise FormatError(f"{source}: a schedule or prediction type this project cannot train")
    return DiffusionConfig(
        num_timesteps=int(config.get("num_train_timesteps", 1000)), schedule=schedule,
        beta_start=float(config.get("beta_start", 1e-4)),
        beta_end=float(config.get("beta_end", 0.02)), prediction=prediction,
    )  # fmt: skip


def assignment_config(model: ModelConfig, image_size: int, num_timesteps: int) -> dict:
    """The custom component's config: the assignment network and the T its time input uses."""
    return {
        "_class_name": "AssignmentUNet",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": model.channels,
        "out_channels": model.channels,
        "hidden_size": model.hidden_size,
        "sample_size": image_size,
        "num_train_timesteps": num_timesteps,
    }
