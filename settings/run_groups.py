"""How a run samples, is evaluated, where it lives and how it is watched: the sample, eval,
run, wandb and sweep settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from ddpm.config import EvalConfig, SampleConfig, TrainConfig
from settings.fields import (
    PGPASSWORD_INSTEAD,
    FieldError,
    Group,
    OptionalPath,
    list_value,
    no_password,
)


class SampleSettings(Group):
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


class EvalSettings(Group):
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


class RunSettings(Group):
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


class WandbSettings(Group):
    """Weights & Biases tracking."""

    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto = online if WANDB_API_KEY is set, else offline"
    )
    project: str = Field("ddpm", min_length=1, description="W&B project")
    entity: str | None = Field(None, description="W&B entity (user or team)")
    # A sweep's trials share one group, named after the sweep (flows.sweep.schedule).
    group: str | None = Field(None, description="W&B group of the run (a sweep's name)")


class SweepSettings(Group):
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
            raise FieldError("sweep.trial", "sweep.storage, sweep.study and sweep.trial go "
                              "together (the sweep sets them)")  # fmt: skip
        return self
