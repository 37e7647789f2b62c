"""What a run trains: the data, the network, the diffusion, the optimizer and the training
loop's settings. Each default is written once, in the core's configuration (`ddpm.config`); a
group adds what the command line needs around it: bounds, a description, the reason for the
value."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator
from pydantic_settings import NoDecode

from ddpm.config import DataConfig, DiffusionConfig, ModelConfig, OptimConfig, TrainConfig
from settings.fields import FolderOrURL, Group, OptionalPath, list_value, no_password


class DataSettings(Group):
    """What to train on."""

    dataset: Literal["cifar10", "folder", "prepared"] = Field(
        DataConfig.dataset,
        description="cifar10 (downloaded to data.root), folder (the images in data.folder) or "
        "prepared (data.folder made by ddpm-prepare)",
    )
    # The assignment kept datasets under ./data.
    root: Path = Field(DataConfig.root, description="where CIFAR-10 is downloaded and extracted")
    folder: FolderOrURL = Field(
        DataConfig.folder,
        description="image folder (PNG/JPEG) for dataset=folder; a prepared dataset's folder "
        "or URL (s3://, gs://, file://, ...) for dataset=prepared",
    )
    url: Annotated[
        str,
        AfterValidator(
            no_password(
                "a mirror that needs a password is not supported: download the archive "
                "yourself and put it in data.root"
            )
        ),
    ] = Field(DataConfig.url, description="CIFAR-10 python archive URL (a mirror may go here)")
    # CIFAR-10's native size; the U-Net needs a multiple of 32.
    image_size: int = Field(
        DataConfig.image_size, ge=32, le=1024, description="image side in px, multiple of 32"
    )
    subset: int = Field(
        DataConfig.subset, ge=0, description="train on N images chosen from the seed; 0 = all"
    )
    # Horizontal flips, as in the DDPM paper's CIFAR-10 runs.
    random_flip: bool = Field(DataConfig.random_flip, description="random horizontal flip")
    # In-memory CIFAR-10 needs no workers; raise it for large image folders.
    num_workers: int = Field(
        DataConfig.num_workers, ge=0, le=64, description="DataLoader worker processes"
    )
    # Device-resident batches skip the DataLoader and the per-step host-to-device copy.
    loader: Literal["auto", "device", "dataloader"] = Field(
        DataConfig.loader, description="auto: keep cifar10 on the training device if it fits"
    )

    # Measured (benchmarks/data.py): from the first epoch on, faster than decoding each epoch.
    prepare: Literal["auto", "off"] = Field(
        DataConfig.prepare,
        description="auto: prepare dataset=folder's images once, on first use, into "
        "data.root/prepared/ and train from that; off: decode the folder's images every epoch",
    )

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (the U-Net halves it 5 times), got {v}")
        return v


class ModelSettings(Group):
    """The U-Net."""

    # The assignment's config trained hidden 128.
    hidden_size: int = Field(
        ModelConfig.hidden_size, ge=8, le=4096, description="U-Net base width, multiple of 8"
    )
    # RGB.
    channels: int = Field(ModelConfig.channels, ge=1, le=4, description="image channels")
    # The assignment's small U-Net is the default; ddpm is Ho et al. 2020's (35.7 M parameters).
    arch: Literal["assignment", "ddpm"] = Field(
        ModelConfig.arch, description="assignment (11.4 M parameters) or ddpm (the paper's U-Net)"
    )
    # The DDPM paper's CIFAR-10 network (model.arch=ddpm only):
    channel_mult: Annotated[list[int], NoDecode] = Field(
        list(ModelConfig.channel_mult),
        min_length=1,
        max_length=8,
        description="ddpm: width multipliers per level",
    )
    num_res_blocks: int = Field(
        ModelConfig.num_res_blocks, ge=1, le=8, description="ddpm: residual blocks per level"
    )
    attention_resolutions: Annotated[list[int], NoDecode] = Field(
        list(ModelConfig.attention_resolutions),
        max_length=8,
        description="ddpm: image sides at which blocks attend",
    )
    dropout: float = Field(
        ModelConfig.dropout, ge=0, lt=1, description="ddpm: dropout in residual blocks"
    )
    # For 128-256 px image folders whose networks do not fit a GPU at the paper's batch sizes.
    checkpointing: bool = Field(
        ModelConfig.checkpointing,
        description="ddpm: activation checkpointing (less memory, ~1/3 more compute)",
    )
    # EDM Appendix F: augmentations the network is told of do not leak into its samples.
    augment_labels: bool = Field(
        ModelConfig.augment_labels,
        description="non-leaky flips: the network is told which images data.random_flip "
        "mirrored, and samples unmirrored",
    )

    # Fine-tuning, or sampling without training: google/ddpm-cifar10-32 or an export.
    init_from: OptionalPath = Field(
        ModelConfig.init_from,
        description="a diffusers folder (UNet2DModel in the paper's layout, or this project's "
        "export) whose weights start a new run; empty = random weights",
    )

    @field_validator("init_from")
    @classmethod
    def _is_folder(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"no such folder: {v} (a diffusers folder, e.g. ddpm-cifar10-32)")
        return v

    @field_validator("hidden_size")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (GroupNorm uses 8 groups), got {v}")
        return v

    @field_validator("channel_mult", "attention_resolutions", mode="before")
    @classmethod
    def _list_of_ints(cls, v: Any) -> Any:
        return list_value(v, "1,2,2,2 or [1, 2, 2, 2]")

    @field_validator("channel_mult", "attention_resolutions")
    @classmethod
    def _in_range(cls, v: list[int], info: Any) -> list[int]:
        top = 64 if info.field_name == "channel_mult" else 4096
        if any(not 1 <= m <= top for m in v):
            raise ValueError(f"every entry must be from 1 to {top}, got {v}")
        return v


class DiffusionSettings(Group):
    """The noise schedule, the network's prediction target and the loss weighting."""

    # DDPM paper, all experiments: T = 1000, linear betas from 1e-4 to 0.02.
    num_timesteps: int = Field(
        DiffusionConfig.num_timesteps, ge=1, le=100_000, description="diffusion steps T"
    )
    beta_start: float = Field(
        DiffusionConfig.beta_start, gt=0, lt=1, description="beta_1 of the linear schedule"
    )
    beta_end: float = Field(
        DiffusionConfig.beta_end, gt=0, lt=1, description="beta_T of the linear schedule"
    )
    # Nichol & Dhariwal 2021: cosine keeps more signal at middle t and spends fewer steps at
    # pure noise. Measured at a fixed budget (README, Samples that look like the data): the
    # DDPM paper's eps drew grey backgrounds with either schedule; v and x0 fixed them and
    # scored level, with either schedule; v with cosine is the default.
    schedule: Literal["linear", "cosine"] = Field(
        DiffusionConfig.schedule,
        description="noise schedule: linear (DDPM paper) or cosine (Nichol & Dhariwal)",
    )
    # DDPM paper: eps; Salimans & Ho 2022: v = sqrt(abar) eps - sqrt(1 - abar) x0.
    prediction: Literal["eps", "v", "x0"] = Field(
        DiffusionConfig.prediction, description="what the network predicts: eps, v or x0"
    )
    # Hang et al. 2023: min-SNR-gamma weighting.
    loss_weighting: Literal["uniform", "min_snr"] = Field(
        DiffusionConfig.loss_weighting,
        description="uniform (L_simple) or min_snr (min(SNR, gamma) on x0's error)",
    )
    min_snr_gamma: float = Field(
        DiffusionConfig.min_snr_gamma, gt=0, le=1e6, description="min_snr's gamma (paper: 5)"
    )
    # Karras et al. 2022 (EDM): continuous sigma, EDM's preconditioning, the log-normal
    # training sigma and its loss weight (ddpm.edm); the discrete settings above then unused.
    formulation: Literal["discrete", "edm"] = Field(
        DiffusionConfig.formulation,
        description="discrete (DDPM timesteps: schedule, prediction, loss_weighting) or edm "
        "(Karras et al. 2022)",
    )
    # EDM: 0.5 for CIFAR-10; measured on the training images when unset, kept in checkpoints.
    sigma_data: float | None = Field(
        DiffusionConfig.sigma_data, gt=0, le=100,
        description="edm: the data's standard deviation; unset = measured when a run starts",
    )  # fmt: skip
    # EDM Table 1: ln sigma ~ N(-1.2, 1.2^2) in training.
    p_mean: float = Field(
        DiffusionConfig.p_mean, ge=-20, le=20, description="edm: mean of ln sigma in training"
    )
    p_std: float = Field(
        DiffusionConfig.p_std, gt=0, le=20, description="edm: std of ln sigma in training"
    )

    @field_validator("beta_end")
    @classmethod
    def _after_start(cls, v: float, info: Any) -> float:
        start = info.data.get("beta_start")
        if start is not None and v <= start:
            raise ValueError(f"must be greater than diffusion.beta_start ({start}), got {v}")
        return v


class OptimSettings(Group):
    """The optimizer and learning-rate schedule."""

    # The assignment used Adam.
    name: Literal["adam", "adamw", "sgd"] = Field(OptimConfig.name, description="optimizer")
    # DDPM paper, CIFAR-10: 2e-4 (the assignment's 1e-5 trains far slower).
    lr: float = Field(OptimConfig.lr, gt=0, le=10, description="peak learning rate")
    # Adam's default beta1; also a common SGD momentum.
    momentum: float = Field(
        OptimConfig.momentum, ge=0, lt=1, description="SGD momentum or Adam/AdamW beta1"
    )
    # DDPM paper: no weight decay.
    weight_decay: float = Field(OptimConfig.weight_decay, ge=0, le=1, description="weight decay")
    # DDPM paper, CIFAR-10: 5000 warm-up steps (of 800k); a shorter run warms up for a tenth.
    warmup_steps: int = Field(
        OptimConfig.warmup_steps,
        ge=0,
        description="linear warm-up steps from 0 to lr; at most a tenth of the run",
    )
    # DDPM paper: constant after warm-up.
    schedule: Literal["constant", "cosine"] = Field(
        OptimConfig.schedule, description="lr after warm-up: constant or cosine decay to 0"
    )
    # DDPM reference code clips the gradient norm to 1.
    grad_clip: float = Field(
        OptimConfig.grad_clip, ge=0, description="max gradient norm; 0 = no clipping"
    )


class TrainSettings(Group):
    """The training loop."""

    # The assignment trained 100 epochs.
    epochs: int = Field(TrainConfig.epochs, ge=1, le=100_000, description="epochs to train")
    # DDPM paper and the assignment: batch 128.
    batch_size: int = Field(TrainConfig.batch_size, ge=1, le=65_536, description="images per step")
    seed: int = Field(
        TrainConfig.seed, ge=0, lt=2**63, description="seed for weights, data order and noise"
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="auto, cpu, cuda or cuda:N"
    )
    # DDPM paper: EMA decay 0.9999.
    ema_decay: float = Field(
        TrainConfig.ema_decay, ge=0, lt=1, description="EMA decay of the weights"
    )
    # EDM2: power-function EMA snapshots, for any EMA length after training (ddpm-ema).
    ema_snapshots: int = Field(
        TrainConfig.ema_snapshots, ge=0, le=10_000,
        description="snapshots of two power-function EMAs (sigma_rel 0.05, 0.10) over the run, "
        "for ddpm-ema; 0 = off",
    )  # fmt: skip
    # Each read of the step metrics waits for the GPU: reading every step would stall it.
    log_every: int = Field(
        TrainConfig.log_every,
        ge=1,
        description="steps between log lines and reads of the step metrics",
    )
    # A few NaN steps (one bad batch) are survivable; a run of them means divergence.
    max_bad_steps: int = Field(
        TrainConfig.max_bad_steps,
        ge=0,
        description="non-finite steps in a row (skipped) before the run fails",
    )
    deterministic: bool = Field(
        TrainConfig.deterministic, description="deterministic kernels (slower)"
    )
    # bf16 autocast runs on tensor cores and needs no loss scaling; CPUs train in fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on CUDA, fp32 on CPU; fp16 uses a gradient scaler"
    )
    # Compiling pays off over a long GPU run; on a CPU it costs minutes for little gain.
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the network; auto = on for CUDA"
    )
    # Data-parallel over torch.distributed: each global batch is shared, so the result is the
    # one-process run's (README, Several GPUs and machines).
    devices: int = Field(
        TrainConfig.devices,
        ge=1,
        le=1024,
        description="processes training data-parallel: GPUs, or CPU processes",
    )
    # Long enough for a first step's compilation; NCCL's own default is 30 minutes.
    rank_timeout: float = Field(
        TrainConfig.rank_timeout,
        gt=0,
        description="seconds a rank may go silent before the run fails",
    )
    # torchrun's --max-restarts: a group that lost a rank starts again from the newest
    # checkpoint (run.checkpoint_every bounds the steps done twice).
    max_restarts: int = Field(
        3, ge=0, le=100, description="restarts of a data-parallel group after a rank fails"
    )
    # Big images on small GPUs: the gradient of a whole batch from smaller forward passes.
    accumulate: int = Field(
        TrainConfig.accumulate,
        ge=1,
        le=4096,
        description="micro-batches per batch (gradient accumulation)",
    )
