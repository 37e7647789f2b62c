"""Typed settings: env (`DDPM_` prefix, `__` between group and field), `.env`, flags, overrides.

Precedence, highest first: overrides (dotted keys, e.g. from a flow's parameters or parsed
flags) > environment > `.env` > defaults. `DDPM_OPTIM__LR=2e-4`, `--optim.lr 2e-4` and the
override `{"optim.lr": 2e-4}` all set the same field.

Each default is written once, in the core's configuration (`ddpm.config`); a settings group
adds what the command line needs around it: bounds, a description, the reason for the value.
Settings with no core counterpart (`auto` choices resolved per machine, run.*, wandb.*) have
their defaults here.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from dotenv import dotenv_values
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, CliSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as _PydanticSettingsError

from ddpm.config import (
    CHURN_SAMPLERS,
    TIMESTEP_SAMPLERS,
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)
from ddpm.errors import UserError

ENV_PREFIX = "DDPM_"
ENV_DELIMITER = "__"


class _Group(BaseModel):
    # A misspelt env var or override (DDPM_OPTIM__LRR) is an error, not silently ignored.
    # NaN and inf never make sense here (an infinite grad_clip would silently disable it).
    # Defaults are validated too, so beta_start=0.5 is checked against the default beta_end.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False
    )


class _FieldError(ValueError):
    """A cross-field rule broken; `field` is the dotted setting the message is about."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def password_in(url: str, instead: str) -> str | None:
    """Why a URL may not be a setting when it carries a password (in its user part, or as a
    `password` query parameter): settings are written to settings.json, the flow run's
    parameters, the logs and the W&B config. None when it carries none. The message shows the
    URL with the password masked, and says where the password goes `instead`."""
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        secret = parts.password is not None or any(k.lower() == "password" for k, _ in query)
    except ValueError:
        return None  # not a URL this check can read; the setting's own checks say so
    if not secret:
        return None
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    masked = urlunsplit((parts.scheme, netloc if parts.password is not None else parts.netloc,
                         parts.path, "password=***" if parts.query else "", ""))  # fmt: skip
    return (
        f"the URL carries a password ({masked}), which would be written to the run's "
        f"settings.json, flow-run parameters, logs and W&B config; {instead}"
    )


def no_password(instead: str) -> Any:
    """A validator refusing a URL that carries a password (password_in)."""

    def check(value: str | None) -> str | None:
        problem = value and password_in(value, instead)
        if problem:
            raise ValueError(problem)
        return value

    return check


PGPASSWORD_INSTEAD = (
    "leave it out of the URL and set PGPASSWORD (or ~/.pgpass) where the sweep and its "
    "workers run: psycopg reads them"
)


# A local folder, or the URL of a prepared dataset in an object store (scheme://...), whose
# credentials come from the environment, never from the URL.
STORE_CREDENTIALS = (
    "leave credentials out of it: the store's own variables (AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) are read where the run goes"
)


def _folder_or_url(value: Any) -> str | Path | None:
    if value is None or isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a folder or a URL, got {value!r}")
    if "://" in value:
        problem = password_in(value, STORE_CREDENTIALS)
        if problem:
            raise ValueError(problem)
        return value
    return Path(value)


FolderOrURL = Annotated[str | Path | None, BeforeValidator(_folder_or_url)]

# An optional path that env, .env and flags can clear: an empty value is None.
OptionalPath = Annotated[Path | None, BeforeValidator(lambda v: None if v == "" else v)]


def list_value(value: Any, example: str) -> Any:
    """A list setting as any source gives it: '1,2,2,2' or JSON '[1, 2, 2, 2]' (env, .env,
    flags, overrides alike), one value, or a list.

    Raises:
        ValueError: for text that is neither, naming the forms with `example`.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return [item.strip() for item in text.split(",") if item.strip()]
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"give a list as {example}, got {value!r}") from None
    return value if isinstance(value, (list, tuple)) else [value]


class DataSettings(_Group):
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


class ModelSettings(_Group):
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


class DiffusionSettings(_Group):
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


class OptimSettings(_Group):
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


class TrainSettings(_Group):
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


class SampleSettings(_Group):
    """The sample grid drawn during training."""

    every: int = Field(
        SampleConfig.every, ge=0, description="epochs between sample grids; 0 = never"
    )
    # 8 x 8 grid, as in the assignment.
    num: int = Field(SampleConfig.num, ge=1, le=4096, description="images per grid")
    # Measured on real images at a fixed budget (README, Samples that look like the data):
    # DPM-Solver++(2M) at 20 network calls scores within 5 % of the 1000-step ancestral
    # sampler at a fiftieth of its cost, and within 7 % of stochastic DDIM at 100 calls at a
    # fifth.
    # With diffusion.formulation edm and no sampler named: heun, 18 steps (35 network calls),
    # EDM's CIFAR-10 choice; the timestep samplers need the discrete formulation.
    sampler: Literal[
        "ddpm", "ddim", "dpmpp_2m", "euler", "heun", "dpmpp_2m_karras", "dpmpp_3m_karras"
    ] = Field(
        SampleConfig.sampler,
        description="on timesteps (discrete only): ddim (steps, eta), dpmpp_2m (DPM-Solver++(2M)) "
        "or ddpm (Algorithm 2, all T steps); on Karras sigmas (either formulation): euler, heun "
        "(EDM Algorithm 2), dpmpp_2m_karras, dpmpp_3m_karras",
    )
    steps: int = Field(
        SampleConfig.steps, ge=1, le=100_000,
        description="the sampler's steps: network calls (heun: 2 steps - 1; ddpm: all T)",
    )  # fmt: skip
    eta: float = Field(
        SampleConfig.eta,
        ge=0,
        le=1,
        description="DDIM noise per step: 0 = deterministic, 1 = ancestral",
    )
    use_ema: bool = Field(SampleConfig.use_ema, description="sample with the EMA weights")
    # The DDPM reference code clips x0_hat when sampling; unclipped, a trained model's samples
    # are mostly noise (errors in eps are multiplied ~150x by 1/sqrt(abar_T)).
    clip_denoised: bool = Field(
        SampleConfig.clip_denoised, description="clip each sampling step's x0 estimate to [-1, 1]"
    )
    # Compiling takes longer than a 50-step DDIM grid saves; 1000 ancestral steps repay it.
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile the sampler's steps (CUDA graphs on CUDA); auto = on for "
        "CUDA with sampler ddpm",
    )
    # EDM eq. 5 and Algorithm 2 (its Table 1 values), for the samplers on sigma.
    rho: float = Field(SampleConfig.rho, gt=0, le=100, description="Karras steps' exponent")
    sigma_min: float | None = Field(
        SampleConfig.sigma_min, gt=0,
        description="the last sigma before 0; unset: edm 0.002, discrete the schedule's sigma_0",
    )  # fmt: skip
    sigma_max: float | None = Field(
        SampleConfig.sigma_max, gt=0,
        description="the first sigma; unset: edm 80, discrete the schedule's sigma_{T-1}",
    )  # fmt: skip
    s_churn: float = Field(
        SampleConfig.s_churn, ge=0, le=1e6,
        description="euler and heun: noise added per step (EDM's S_churn; 0 = the ODE)",
    )  # fmt: skip
    s_tmin: float = Field(SampleConfig.s_tmin, ge=0, description="churn only where sigma >= this")
    s_tmax: float | None = Field(
        SampleConfig.s_tmax, ge=0, description="churn only where sigma <= this; unset: no bound"
    )
    s_noise: float = Field(
        SampleConfig.s_noise, ge=0, le=10, description="scale of the churn's noise (S_noise)"
    )


class EvalSettings(_Group):
    """FID and KID of samples against the training images (torch-fidelity)."""

    every: int = Field(
        EvalConfig.every, ge=0, description="epochs between FID/KID evaluations; 0 = never"
    )
    # DDPM paper: FID of 50,000 samples (fewer samples give a higher, biased FID).
    num_samples: int = Field(
        EvalConfig.num_samples, ge=2, le=10_000_000, description="images drawn for one evaluation"
    )
    metrics: Annotated[list[Literal["fid", "kid"]], NoDecode] = Field(
        list(EvalConfig.metrics), min_length=1, description="metrics to compute: fid, kid"
    )
    # No machine without internet can fetch torch-fidelity's Inception weights.
    weights: OptionalPath = Field(
        EvalConfig.weights,
        description="local Inception weights (weights-inception-2015-12-05-6726825d.pth); "
        "empty = torch-fidelity downloads them",
    )
    batch_size: int = Field(
        EvalConfig.batch_size,
        ge=1,
        le=65_536,
        description="images per sampling batch and per Inception batch",
    )
    cache_dir: OptionalPath = Field(
        None, description="cache of the training images' statistics; empty = run.dir/fid-stats"
    )

    @field_validator("metrics", mode="before")
    @classmethod
    def _list_of_names(cls, v: Any) -> Any:
        return list_value(v, 'fid,kid or ["fid", "kid"]')

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"no such file: {v} (empty = torch-fidelity downloads the weights)")
        return v


class RunSettings(_Group):
    """Where a run lives."""

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="run folder name under run.dir; default: hash of the settings",
    )
    dir: Path = Field(Path("runs"), description="folder holding all runs")
    keep: int = Field(TrainConfig.keep, ge=1, description="epoch checkpoints kept")
    checkpoint_every: int = Field(
        TrainConfig.checkpoint_every,
        ge=0,
        description="steps between mid-epoch checkpoints; 0 = off",
    )
    # Schedulers send SIGTERM and SIGKILL after a grace period: SLURM's KillWait and Docker's
    # stop wait 10 s; Kubernetes waits 30 s. A run saves within one training step.
    stop_timeout: float = Field(
        30.0, gt=0, le=3600, description="seconds from SIGTERM/SIGINT to exit, at most"
    )
    # Prefect waits 20 s for its temporary server; a loaded 2-core machine took longer.
    server_timeout: float = Field(
        120.0, gt=0, le=3600, description="seconds the temporary Prefect server may take to start"
    )
    debug: bool = Field(False, description="print tracebacks for errors the user can fix")


class WandbSettings(_Group):
    """Weights & Biases tracking."""

    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto = online if WANDB_API_KEY is set, else offline"
    )
    project: str = Field("ddpm", min_length=1, description="W&B project")
    entity: str | None = Field(None, description="W&B entity (user or team)")
    # A sweep's trials share one group, named after the sweep (flows.sweep.schedule).
    group: str | None = Field(None, description="W&B group of the run (a sweep's name)")


class SweepSettings(_Group):
    """Set by a sweep for its trials (flows.sweep.schedule): where the trial reports its metric
    each epoch, so that the sweep's pruner can stop it early. Empty = not a pruned trial."""

    # An Optuna RDB URL every worker reaches: sqlite:///PATH on one machine, or
    # postgresql+psycopg://USER@HOST/DB (the password from PGPASSWORD or ~/.pgpass, not here).
    storage: Annotated[str | None, AfterValidator(no_password(PGPASSWORD_INSTEAD))] = Field(
        None, description="the sweep's Optuna study database URL"
    )
    study: str | None = Field(None, description="the Optuna study (the sweep's name)")
    trial: int | None = Field(None, ge=0, description="this run's trial in the sweep (its index)")

    @model_validator(mode="after")
    def _all_or_none(self) -> SweepSettings:
        given = [v is not None for v in (self.storage, self.study, self.trial)]
        if any(given) and not all(given):
            raise _FieldError("sweep.trial", "sweep.storage, sweep.study and sweep.trial go "
                              "together (the sweep sets them)")  # fmt: skip
        return self


class Settings(BaseSettings):
    """Every setting of a training run, grouped."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        env_file=".env",
        env_file_encoding="utf-8",
        # A .env may hold other tools' variables (WANDB_API_KEY); our own DDPM_* names are
        # checked by _unknown_env_names, and unknown override keys by nest.
        extra="ignore",
        validate_default=True,
    )

    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    diffusion: DiffusionSettings = DiffusionSettings()
    optim: OptimSettings = OptimSettings()
    train: TrainSettings = TrainSettings()
    sample: SampleSettings = SampleSettings()
    eval: EvalSettings = EvalSettings()
    run: RunSettings = RunSettings()
    wandb: WandbSettings = WandbSettings()
    sweep: SweepSettings = SweepSettings()

    def _a_prepared_dataset(self) -> None:
        """data.folder holds a prepared dataset of data.image_size and model.channels."""
        from ddpm.prepared import PreparedError, read_manifest

        try:
            shape = tuple(read_manifest(self.data.folder)["shape"])
        except PreparedError as err:
            raise _FieldError("data.folder", str(err)) from None
        size, channels = self.data.image_size, self.model.channels
        if shape != (channels, size, size):
            raise _FieldError(
                "data.image_size",
                f"{self.data.folder} holds {shape[0]}-channel images of {shape[1]} px; set "
                f"data.image_size {shape[1]} and model.channels {shape[0]}, or prepare it "
                f"again at {size} px and {channels} channels",
            )

    def _a_prepared_dataset_url(self) -> None:
        """A URL in data.folder names a prepared dataset in a store pyarrow.fs reads (what it
        holds is checked when the run fetches it, where the credentials are)."""
        from ddpm.prepared import URL_SCHEMES

        folder = str(self.data.folder)
        scheme = folder.split("://", 1)[0].lower()
        if scheme not in URL_SCHEMES:
            schemes = ", ".join(URL_SCHEMES)
            raise _FieldError("data.folder", f"{folder}: a URL of {scheme}://, which is not read; "
                              f"give a URL of {schemes}, or a local folder")  # fmt: skip
        if self.data.dataset != "prepared":
            raise _FieldError(
                "data.folder",
                f"{folder}: a URL is read as a prepared dataset only; set data.dataset=prepared "
                "(prepare the images with ddpm-prepare and upload that folder)",
            )

    def _data_folder(self) -> None:
        """data.folder is given exactly when data.dataset reads it, and is what it reads."""
        data = self.data
        if data.dataset != "cifar10" and data.folder is None:
            raise _FieldError("data.folder", f"is required when data.dataset is {data.dataset!r}")
        if data.folder is not None and data.dataset == "cifar10":
            raise _FieldError(
                "data.folder",
                f"is set ({data.folder}) but data.dataset is {data.dataset!r}, which does not "
                "read it: set data.dataset=folder to train on the folder (or prepared, for a "
                "folder ddpm-prepare made), or leave data.folder out",
            )
        if isinstance(data.folder, str):  # a URL (FolderOrURL)
            self._a_prepared_dataset_url()
        elif data.dataset != "cifar10" and not data.folder.is_dir():
            what = "not a folder" if data.folder.exists() else "no such folder"
            raise _FieldError("data.folder", f"{what}: {data.folder}")
        if data.dataset == "prepared" and not isinstance(data.folder, str):
            self._a_prepared_dataset()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        self._data_folder()
        if self.data.dataset == "cifar10" and self.data.image_size != 32:
            raise _FieldError("data.image_size", "must be 32 for cifar10 (its native size)")
        if self.data.dataset == "cifar10" and self.model.channels != 3:
            raise _FieldError("model.channels", "must be 3 for cifar10 (RGB)")
        if (
            self.data.loader == "device"
            and self.data.dataset == "folder"
            and self.data.prepare == "off"
        ):
            raise _FieldError("data.loader", "device needs images in memory: data.dataset "
                              "cifar10 or prepared, or folder with data.prepare=auto")  # fmt: skip
        model, size = self.model, self.data.image_size
        if model.arch == "ddpm":
            if model.hidden_size % 32:
                raise _FieldError(
                    "model.hidden_size",
                    f"must be a multiple of 32 for model.arch=ddpm (GroupNorm(32)), got "
                    f"{model.hidden_size}",
                )
            reached = [size >> i for i in range(len(model.channel_mult))]
            missing = sorted(set(model.attention_resolutions) - set(reached))
            if missing:
                raise _FieldError(
                    "model.attention_resolutions",
                    f"{missing} never reached: with data.image_size {size} and "
                    f"{len(model.channel_mult)} levels (model.channel_mult) the network sees "
                    f"{reached}",
                )
        if model.checkpointing and model.arch != "ddpm":
            raise _FieldError("model.checkpointing", "applies to model.arch=ddpm only")
        if model.augment_labels and not self.data.random_flip:
            raise _FieldError("model.augment_labels", "labels the flips of data.random_flip, "
                              "which is off")  # fmt: skip
        if self.train.accumulate > self.train.batch_size:
            raise _FieldError(
                "train.accumulate",
                f"must be at most train.batch_size ({self.train.batch_size}): each micro-batch "
                "takes a share of a batch",
            )
        if self.train.batch_size < self.train.devices:
            raise _FieldError(
                "train.devices",
                f"must be at most train.batch_size ({self.train.batch_size}): each process "
                "takes a share of every batch",
            )
        self._sample_rules()
        return self

    def _sample_rules(self) -> None:
        """The sample.* settings against each other and the diffusion's (_consistent's)."""
        self._sampler_fits_the_formulation()
        sample = self.sample
        if sample.s_churn > 0 and sample.sampler not in CHURN_SAMPLERS:
            raise _FieldError("sample.s_churn", "applies to sample.sampler euler or heun only")
        if sample.sigma_min and sample.sigma_max and sample.sigma_min > sample.sigma_max:
            raise _FieldError("sample.sigma_min", f"must be at most sample.sigma_max "
                              f"({sample.sigma_max}), got {sample.sigma_min}")  # fmt: skip
        if sample.sampler in ("ddim", "dpmpp_2m") and sample.steps > self.diffusion.num_timesteps:
            raise _FieldError(
                "sample.steps",
                f"must be at most diffusion.num_timesteps ({self.diffusion.num_timesteps})",
            )

    def _sampler_fits_the_formulation(self) -> None:
        """An edm run has no timesteps: with no sampler named it samples with heun on 18
        steps (EDM's CIFAR-10 choice, 35 network calls); a timestep sampler named is refused."""
        if self.diffusion.formulation != "edm":
            return
        sample = self.sample
        if sample.sampler not in TIMESTEP_SAMPLERS:
            return
        if "sampler" in sample.model_fields_set:
            raise _FieldError(
                "sample.sampler",
                f"{sample.sampler} steps through the discrete formulation's timesteps; with "
                "diffusion.formulation edm use euler, heun, dpmpp_2m_karras or dpmpp_3m_karras",
            )
        update = {"sampler": "heun"}
        if "steps" not in sample.model_fields_set:
            update["steps"] = 18
        self.sample = sample.model_copy(update=update)


def env_name(field: str) -> str:
    """'optim.lr' -> 'DDPM_OPTIM__LR'."""
    return ENV_PREFIX + field.upper().replace(".", ENV_DELIMITER)


def setting_name(env_var: str) -> str:
    """'DDPM_OPTIM__LR' -> 'optim.lr' (the inverse of env_name)."""
    return env_var.removeprefix(ENV_PREFIX).lower().replace(ENV_DELIMITER, ".")


def flag_name(field: str) -> str:
    """'optim.lr' -> '--optim.lr'."""
    return f"--{field}"


class SettingsError(UserError, ValueError):
    """Invalid settings; the message names each bad field's env variable and flag."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)  # (dotted field, what is wrong)
        self.fields = [field for field, _ in self.problems]
        lines = [
            one_line(f"{field} ({env_name(field)} / {flag_name(field)}): {message}" if field
                     else message)
            for field, message in self.problems
        ]  # fmt: skip
        if len(lines) == 1:  # one line, as the command line's last line
            super().__init__(f"invalid setting {lines[0]}" if self.fields[0] else lines[0])
        else:
            super().__init__("invalid settings:\n  " + "\n  ".join(lines))


def known_settings() -> list[str]:
    """Every setting's dotted name ('optim.lr', ...)."""
    return [
        f"{group}.{field}"
        for group, info in Settings.model_fields.items()
        for field in info.annotation.model_fields
    ]


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """'; did you mean X?' for the known name closest to a misspelt one (closest_name), else
    ''."""
    close = closest_name(name, known)
    return f"; did you mean {close}?" if close else ""


def closest_name(name: str, known: Sequence[str]) -> str | None:
    """The known name a misspelt one most likely meant, or None: compared on their letters and
    digits alone (so `DDPM_MODEL__NUM__RES_BLOCKS` finds `DDPM_MODEL__NUM_RES_BLOCKS`), by edit
    distance with a swap of two neighbours counting once (`floder` is `folder`, not
    `loader`), within a third of the name's length."""
    letters = _letters(name)
    scored = sorted((_edits(letters, _letters(k)), i, k) for i, k in enumerate(known))
    if not scored or not letters:
        return None
    edits, _, best = scored[0]
    return best if edits <= max(1, len(letters) // 3) else None


def _letters(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _edits(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and swaps of
    two neighbours, one each."""
    previous, row = None, list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            current[j] = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + (x != y))
            if previous is not None and i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                current[j] = min(current[j], previous[j - 2] + 1)
        previous, row = row, current
    return row[-1]


def _unknown(name: str) -> str:
    """The message for a dotted name that is not a setting, with the closest one's doors."""
    close = closest_name(name, known_settings())
    hint = f"; did you mean {close} ({env_name(close)} / {flag_name(close)})?" if close else ""
    return f"unknown setting{hint} (see --help for the list)"


def one_line(text: str) -> str:
    """text with its line breaks written as \\n, so a value holding one (a path, say) keeps a
    message on one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _problems(err: ValidationError, env_names: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Turn pydantic's errors into (dotted field, message saying what is accepted and got).

    Args:
        env_names: the DDPM_* names the environment and `.env` give: an unknown field that
            came from one (DDPM_MODEL__NUM__RES_BLOCKS arrives as model.num) is matched as the
            whole variable."""
    problems = []
    for e in err.errors():
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            problems.append((cause.field, str(cause)))
            continue
        names = [str(part) for part in e["loc"] if not isinstance(part, int)]
        entries = [part for part in e["loc"] if isinstance(part, int)]  # a list's items
        field = ".".join(names)
        if e["type"] == "extra_forbidden":
            given = [n for n in env_names if n.startswith(env_name(field) + ENV_DELIMITER)]
            if given:  # a variable with a delimiter too many: match the whole name
                known = [env_name(f) for f in known_settings()]
                problems.append(("", f"unknown setting {given[0]}{did_you_mean(given[0], known)} "
                                 "(see --help for the list)"))  # fmt: skip
            else:
                problems.append((field, _unknown(field)))
            continue
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] != "value_error" and not isinstance(e.get("input"), (dict, list)):
            message += f", got {e.get('input')!r}"
        if entries:
            message = f"entry {entries[0] + 1}: {message}"
        problems.append((field, message))
    return problems


def nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """{'optim.lr': 1e-3} -> {'optim': {'lr': 1e-3}}; a key without a dot sets a whole group.

    Dotted keys win over the same field inside a whole-group value, whatever the key order; the
    input is not modified.

    Raises:
        SettingsError: for a key whose group is not a setting group.
    """
    groups = set(Settings.model_fields)
    nested: dict[str, Any] = {}
    for key, value in sorted(overrides.items(), key=lambda kv: "." in str(kv[0])):
        group, _, field = str(key).partition(".")
        if group not in groups:
            raise SettingsError([(str(key), _unknown(str(key)))])
        if not field:
            nested[group] = dict(value) if isinstance(value, Mapping) else value
        elif isinstance(nested.setdefault(group, {}), dict):
            nested[group][field] = value
        else:
            raise SettingsError([(str(key), f"cannot be set beside a non-mapping {group!r}")])
    return nested


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _env_names(env_file: str | Path | None) -> list[str]:
    """The DDPM_* names of the environment and the `.env` file, upper-case, sorted."""
    names = {name.upper() for name in os.environ}
    if env_file is not None and Path(env_file).is_file():
        names |= {name.upper() for name in dotenv_values(env_file)}
    return sorted(name for name in names if name.startswith(ENV_PREFIX))


def _unknown_env_names(env_file: str | Path | None) -> list[tuple[str, str]]:
    """DDPM_* variables (environment or .env) whose group is not a setting group: typos such
    as DDPM_OPTIMM__LR or DDPM_OPTIM_LR, which would otherwise be ignored silently."""
    groups = {group.upper() for group in Settings.model_fields}
    known = [env_name(field) for field in known_settings()]
    problems = []
    for name in _env_names(env_file):
        group = name[len(ENV_PREFIX) :].partition(ENV_DELIMITER)[0]
        if group not in groups:
            hint = did_you_mean(name, known)
            problems.append(("", f"unknown setting {name}{hint} (see --help for the list)"))
    return problems


def load_settings(
    overrides: Mapping[str, Any] | None = None, *, env_file: str | Path | None = ".env"
) -> Settings:
    """Resolve settings from defaults, `.env`, the environment and dotted overrides.

    Args:
        overrides: dotted setting names to values, e.g. {"train.epochs": 3}; highest precedence.
        env_file: the dotenv file to read (missing is fine); None reads none.

    The settings are validated once per process for the same inputs (the overrides, the
    DDPM_* environment and the `.env` file's text): the command line validates them before
    heavy imports, and the flow it runs gets the same object back.

    Raises:
        SettingsError: naming every invalid field with its env variable and flag.
    """
    key = _inputs(overrides, env_file)
    if key not in _VALIDATED:
        _VALIDATED.clear()  # one entry: a process runs one set of settings at a time
        _VALIDATED[key] = _validate(overrides, env_file)
    return _VALIDATED[key].model_copy(deep=True)


_VALIDATED: dict[str, Settings] = {}


def _inputs(overrides: Mapping[str, Any] | None, env_file: str | Path | None) -> str:
    """Everything load_settings reads, as one string."""
    env = sorted((k, v) for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX))
    text = None
    if env_file is not None and Path(env_file).is_file():
        text = Path(env_file).read_bytes().decode(errors="backslashreplace")
    given = {
        "overrides": dict(overrides or {}), "env": env, "file": [str(env_file), text],
        "cwd": os.getcwd(),  # relative paths (eval.weights) are checked from here
    }  # fmt: skip
    return json.dumps(given, sort_keys=True, default=str)


def _check_env_file(env_file: str | Path | None) -> None:
    """A `.env` that cannot be read as a whole is an error naming the file and the line (python-
    dotenv would skip the line with a warning that names no setting, and the run would go on
    without it).

    Raises:
        SettingsError: for a file that is not UTF-8 text, or a line that is not NAME=VALUE.
    """
    from dotenv.parser import parse_stream

    if env_file is None or not Path(env_file).is_file():
        return
    try:
        text = Path(env_file).read_bytes().decode()
    except UnicodeDecodeError as err:
        line = Path(env_file).read_bytes()[: err.start].count(b"\n") + 1
        raise SettingsError([("", f"{env_file}, line {line}: not UTF-8 text")]) from None
    except OSError as err:
        raise SettingsError([("", f"{env_file}: cannot be read ({err.strerror})")]) from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            shown = binding.original.string.strip()[:60]
            raise SettingsError([("", f"{env_file}, line {binding.original.line}: cannot be "
                                  f"read as NAME=VALUE ({shown!r})")])  # fmt: skip


def _validate(overrides: Mapping[str, Any] | None, env_file: str | Path | None) -> Settings:
    _check_env_file(env_file)
    unknown = _unknown_env_names(env_file)
    if unknown:
        raise SettingsError(unknown)
    try:
        return Settings(_env_file=env_file, **nest(overrides or {}))
    except ValidationError as err:
        raise SettingsError(_problems(err, _env_names(env_file))) from None
    except _PydanticSettingsError as err:
        names = set(os.environ)
        if env_file is not None and Path(env_file).is_file():
            names |= set(dotenv_values(env_file))
        given = [setting_name(n.upper()) for n in names if n.upper().startswith(ENV_PREFIX)]
        raise _undecodable(err, given) from None


def _undecodable(err: _PydanticSettingsError, given: Sequence[str]) -> SettingsError:
    """pydantic-settings' error for a value it cannot decode, which names only a group: a
    whole group given as text that is not JSON (every list setting takes its own forms, see
    list_value). The error names the group's settings given, else the group."""
    match = re.search(r'field "(\w+)"', str(err))
    group = match[1] if match else ""
    inside = sorted({f for f in given if f.startswith(f"{group}.")})
    fields = [group] if group in given or not inside else inside
    cause = " ".join(str(err.__cause__ or err).split())
    example = f'{{"{next(iter(Settings.model_fields[group].annotation.model_fields))}": ...}}'
    return SettingsError(
        [(f, f"cannot be decoded ({cause}); give a whole group as JSON, e.g. {example}")
         for f in fields]
    )  # fmt: skip


def parse_flags(argv: Sequence[str], prog: str | None = None) -> dict[str, Any]:
    """Parse `--group.field value` flags into dotted overrides (only the flags given).

    `--help` prints every setting with its env variable and default, then exits.

    Raises:
        SettingsError: for an unknown flag or a flag without a value.
    """
    try:
        source = CliSettingsSource(
            Settings,
            cli_parse_args=list(argv),
            cli_prog_name=prog,
            cli_exit_on_error=False,
            cli_show_env_vars=True,
            cli_avoid_json=True,
            cli_hide_none_type=True,
        )
        return flatten(source())
    except _PydanticSettingsError as err:
        given = [arg[2:].partition("=")[0] for arg in argv if str(arg).startswith("--")]
        if "error parsing value" in str(err):
            raise _undecodable(err, given) from None
        known = {flag_name(field) for field in known_settings()} | {"--help"}
        unknown = [f"--{name}" for name in given if f"--{name}" not in known]
        if unknown:  # argparse's "unrecognized arguments: ..." names them without a hint
            raise SettingsError([
                ("", f"unknown flag {flag}{did_you_mean(flag, known)} (see --help for the list)")
                for flag in unknown
            ]) from None  # fmt: skip
        message = str(err).removeprefix("error parsing CLI: ")
        valueless = re.fullmatch(r"argument --([\w.]+): expected one argument", message)
        if valueless:  # a flag last, or before a value argparse takes for a flag (-inf)
            field = valueless[1]
            raise SettingsError([(field, f"needs a value (one that starts with '-' goes as "
                                  f"--{field}=VALUE)")]) from None  # fmt: skip
        raise SettingsError([("", f"bad flags: {message} (see --help)")]) from None
