"""The core's configuration: one frozen dataclass per concern, holding resolved plain values.

`settings.core_config` builds a `Config` from validated settings (device, precision and compile
resolved for this machine); a notebook builds one directly, e.g.
`Config(model=ModelConfig(hidden_size=32), train=TrainConfig(epochs=2))`. The defaults here are
every run's defaults, written once: `settings.groups` takes its own from them, and the core's
functions take these values from a config, not from defaults of their own. Nothing here imports
torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class DataConfig:
    """What to train on, and how batches reach the device."""

    dataset: Literal["cifar10", "folder", "prepared"] = "cifar10"
    root: Path = Path("data")  # where CIFAR-10 is downloaded and extracted
    folder: Path | str | None = None  # image folder (dataset="folder"), prepared dataset or URL
    url: str = CIFAR10_URL
    image_size: int = 32  # px; a multiple of 32 (the U-Net halves it 5 times)
    subset: int = 0  # train on this many images chosen from the seed; 0 = all
    random_flip: bool = True  # horizontal flips, as in the DDPM paper's CIFAR-10 runs
    num_workers: int = 0  # DataLoader worker processes (image folders)
    loader: Literal["auto", "device", "dataloader"] = "auto"  # see data.TrainingData
    # An image folder prepared once on first use (ddpm.prepare.prepare_folder) into
    # root/prepared/, then read like dataset="prepared": the same images, no decode per epoch.
    prepare: Literal["auto", "off"] = "auto"


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net: the assignment's (ddpm.unet) or the DDPM paper's (ddpm.ddpm_unet)."""

    hidden_size: int = 128  # base width: a multiple of 8 (assignment) or 32 (ddpm)
    channels: int = 3  # image channels
    arch: Literal["assignment", "ddpm"] = "assignment"
    # The DDPM paper's network only (its CIFAR-10 values):
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # width multipliers, one per resolution
    num_res_blocks: int = 2  # residual blocks per resolution
    attention_resolutions: tuple[int, ...] = (16,)  # sides at which blocks attend
    dropout: float = 0.1
    checkpointing: bool = False  # recompute activations in the backward pass (less memory)
    init_from: Path | None = None  # a diffusers folder whose weights start a new run
    # Non-leaky flips (EDM Appendix F): the training step flips (data.random_flip) and tells
    # the network, which samples with the label 0, so samples are not mirrored data.
    augment_labels: bool = False


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise schedule, what the network predicts and how the loss weighs timesteps
    (ddpm.schedules)."""

    num_timesteps: int = 1000  # T (DDPM paper)
    beta_start: float = 1e-4  # the linear schedule's beta_1 (DDPM paper)
    beta_end: float = 0.02  # the linear schedule's beta_T (DDPM paper)
    schedule: Literal["linear", "cosine"] = "cosine"
    prediction: Literal["eps", "v", "x0"] = "v"
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    min_snr_gamma: float = 5.0  # Hang et al. 2023
    # discrete (the above; DDPM) or edm (Karras et al. 2022, ddpm.edm: continuous sigma,
    # EDM's preconditioning, noise distribution and loss weight; the above unused).
    formulation: Literal["discrete", "edm"] = "discrete"
    sigma_data: float | None = None  # edm: the data's std; None = measured when a run starts
    p_mean: float = -1.2  # edm: ln sigma ~ N(p_mean, p_std^2) in training (EDM Table 1)
    p_std: float = 1.2

    @classmethod
    def from_record(cls, record: dict) -> DiffusionConfig:
        """The config a checkpoint's record describes; records written before a field existed
        get the value every run had then (LEGACY_DIFFUSION), not today's default."""
        return cls(**{**LEGACY_DIFFUSION, **record})


# What every run trained with before diffusion.schedule, prediction and loss_weighting existed.
LEGACY_DIFFUSION = {
    "schedule": "linear", "prediction": "eps", "loss_weighting": "uniform",
    "formulation": "discrete",
}  # fmt: skip


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer, its lr schedule and gradient clipping."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 2e-4  # the peak lr
    momentum: float = 0.9  # SGD momentum or Adam/AdamW beta1
    weight_decay: float = 0.0
    warmup_steps: int = 5000  # at most a tenth of the run (training.run_warmup_steps)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping


@dataclass(frozen=True)
class TrainConfig:
    """The training loop, on one resolved device."""

    epochs: int = 100
    batch_size: int = 128
    seed: int = 0  # weights, data order and flips, noise, the sample grid's noise
    device: str = "cpu"  # resolved: cpu, cuda or cuda:N
    ema_decay: float = 0.9999
    # Post-hoc EMA (EDM2, ddpm.phema): snapshots over the run of two power-function EMAs
    # (sigma_rel 0.05 and 0.10), from which ddpm-ema rebuilds any EMA length; 0 = off.
    ema_snapshots: int = 0
    log_every: int = 100  # steps between reads of the step metrics (each read waits)
    max_bad_steps: int = 10  # non-finite steps in a row before the run fails
    deterministic: bool = False
    precision: Precision = "fp32"  # resolved: fp32, bf16 or fp16
    compile: bool = False  # torch.compile the network
    fused: bool = False  # fused optimizer kernels: one launch per step (CUDA)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = off
    keep: int = 3  # epoch checkpoints kept
    devices: int = 1  # data-parallel processes (ddpm.distributed); 1 = this process alone
    accumulate: int = 1  # micro-batches per batch (gradient accumulation); 1 = the whole batch
    rank_timeout: float = 300.0  # seconds a rank may go silent before the run fails


# The samplers by what they step through (ddpm.samplers, ddpm.sigma_samplers), here so that the
# settings check them without importing torch.
TIMESTEP_SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpmpp_2m")
SIGMA_SAMPLERS: tuple[str, ...] = ("euler", "heun", "dpmpp_2m_karras", "dpmpp_3m_karras")
CHURN_SAMPLERS: tuple[str, ...] = ("euler", "heun")  # take EDM's S_churn


@dataclass(frozen=True)
class SampleConfig:
    """The sample grid drawn during training."""

    every: int = 1  # epochs between grids; 0 = never
    num: int = 64
    # ddpm, ddim, dpmpp_2m: on the discrete timesteps; euler, heun, dpmpp_2m_karras,
    # dpmpp_3m_karras: on Karras steps of sigma (ddpm.sigma_samplers), either formulation.
    sampler: Literal[
        "ddpm", "ddim", "dpmpp_2m", "euler", "heun", "dpmpp_2m_karras", "dpmpp_3m_karras"
    ] = "dpmpp_2m"
    steps: int = 20  # the sampler's steps: network calls (heun: 2 steps - 1; ddpm: all T)
    eta: float = 1.0  # DDIM's fresh noise per step: 0 = deterministic, 1 = ancestral
    use_ema: bool = True
    clip_denoised: bool = True  # clip each step's x0 estimate to [-1, 1]
    compile: bool = False  # torch.compile the sampler's steps
    # The samplers on sigma (EDM sec. 3-4, Algorithm 2):
    rho: float = 7.0  # Karras steps' exponent (EDM eq. 5)
    sigma_min: float | None = None  # None: edm 0.002, discrete its schedule's sigma_0
    sigma_max: float | None = None  # None: edm 80, discrete its schedule's sigma_{T-1}
    s_churn: float = 0.0  # euler and heun: stochasticity (0 = the deterministic ODE)
    s_tmin: float = 0.0
    s_tmax: float | None = None  # None: no upper bound
    s_noise: float = 1.0


@dataclass(frozen=True)
class EvalConfig:
    """FID and KID of samples against the training images, during training (ddpm.evaluation)."""

    every: int = 0  # epochs between evaluations; 0 = never
    num_samples: int = 50_000  # DDPM paper: FID of 50,000 samples
    metrics: tuple[str, ...] = ("fid", "kid")
    weights: Path | None = None  # a local Inception weights file; None = torch-fidelity's download
    batch_size: int = 256  # images per sampling batch and per Inception batch
    cache_dir: Path = Path("runs/fid-stats")  # the training images' statistics, per dataset


@dataclass(frozen=True)
class Config:
    """Everything the core needs to train and sample one run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one training image."""
        return (self.model.channels, self.data.image_size, self.data.image_size)
