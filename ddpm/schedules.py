"""The math that training and every sampler share: noise schedules, what the network predicts,
and how the loss weighs timesteps.

Timesteps are 0-indexed: t in {0, ..., T-1}; abar_t = prod_{s <= t} (1 - beta_s). Schedules are
computed in float64 (and stored as float32 by DiffusionModel); the samplers take their
per-step coefficients from the float64 values.

- Schedules (`diffusion.schedule`): `linear` (DDPM paper: betas from 1e-4 to 0.02 over T =
  1000) and `cosine` (Nichol & Dhariwal 2021, eq. 17: abar_t = f(t) / f(0),
  f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), s = 0.008, each beta capped at 0.999 - the
  same values as diffusers' `squaredcos_cap_v2`).
- Predictions (`diffusion.prediction`): the network's output is `eps` (the noise, DDPM paper),
  `v` = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022) or `x0` (the clean image).
- Loss weighting (`diffusion.loss_weighting`): `uniform` (L_simple: the plain mean squared error
  of the prediction) or `min_snr` (Hang et al. 2023: the per-timestep weight that makes the loss
  min(SNR_t, gamma) times the squared error of x0, SNR_t = abar_t / (1 - abar_t)).
"""

from __future__ import annotations

import math
from typing import Literal, TypeVar

import torch

Schedule = Literal["linear", "cosine"]
Prediction = Literal["eps", "v", "x0"]
LossWeighting = Literal["uniform", "min_snr"]
SCHEDULES: tuple[str, ...] = ("linear", "cosine")
PREDICTIONS: tuple[str, ...] = ("eps", "v", "x0")
LOSS_WEIGHTINGS: tuple[str, ...] = ("uniform", "min_snr")

COSINE_OFFSET = 0.008  # s of Nichol & Dhariwal 2021, eq. 17: keeps beta_0 from being tiny
MAX_BETA = 0.999  # Nichol & Dhariwal 2021: betas capped to avoid a singularity at t = T

X = TypeVar("X", torch.Tensor, float)


def linear_betas(beta_start: float, beta_end: float, num_timesteps: int) -> torch.Tensor:
    """(T,) float64 betas spaced linearly from beta_start to beta_end (DDPM paper, sec. 4).

    Raises:
        ValueError: unless 0 < beta_start < beta_end < 1 and T >= 1.
    """
    _check_timesteps(num_timesteps)
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(
            f"betas must satisfy 0 < beta_start < beta_end < 1, got ({beta_start}, {beta_end})"
        )
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int) -> torch.Tensor:
    """(T,) float64 betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), each
    1 - abar(t + 1) / abar(t) capped at MAX_BETA."""
    _check_timesteps(num_timesteps)

    def f(t: float) -> float:
        return math.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    T = num_timesteps
    betas = [min(1 - f((i + 1) / T) / f(i / T), MAX_BETA) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def named_betas(
    schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """(T,) float64 betas of a schedule by name; beta_start and beta_end are linear's only.

    Raises:
        ValueError: for an unknown schedule, naming the known ones.
    """
    if schedule == "linear":
        return linear_betas(beta_start, beta_end, num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {SCHEDULES}")


def schedule_constants(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The quantities derived from (T,) float64 betas, in float64.

    Returns:
        name -> (T,) tensor: betas, alphas_cumprod, alphas_cumprod_prev,
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, posterior_variance (beta~_t,
        DDPM eq. 7; 0 at t = 0), posterior_mean_coef1 and posterior_mean_coef2 (the weights of
        x0 and x_t in the posterior mean mu~_t, eq. 7).
    """
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        # DDPM eq. 7: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
        "posterior_variance": betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        # DDPM eq. 7: mu~_t(x_t, x0) = coef1 * x0 + coef2 * x_t
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
        * alphas.sqrt()
        / (1.0 - alphas_cumprod),
    }


def linear_beta_schedule(
    beta_start: float, beta_end: float, num_timesteps: int
) -> dict[str, torch.Tensor]:
    """schedule_constants of the linear schedule (see linear_betas), in float64."""
    return schedule_constants(linear_betas(beta_start, beta_end, num_timesteps))


def _check_timesteps(num_timesteps: int) -> None:
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def prediction_target(
    prediction: str, x0: torch.Tensor, eps: torch.Tensor, sqrt_abar: X, sqrt_one_minus_abar: X
) -> torch.Tensor:
    """What the network is trained to output for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.

    Args:
        prediction: eps, v or x0.
        x0, eps: (B, C, H, W) the clean images and the noise.
        sqrt_abar, sqrt_one_minus_abar: floats, or tensors broadcasting against x0 (B, 1, 1, 1).

    Returns:
        (B, C, H, W): eps; v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, sec. 4);
        or x0.
    """
    if prediction == "eps":
        return eps
    if prediction == "v":
        return sqrt_abar * eps - sqrt_one_minus_abar * x0
    if prediction == "x0":
        return x0
    check_prediction(prediction)
    raise AssertionError  # unreachable


def split_prediction(
    prediction: str,
    output: torch.Tensor,
    x_t: torch.Tensor,
    sqrt_abar: X,
    sqrt_one_minus_abar: X,
    clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's output at x_t as an estimate of the clean image and of the noise.

    With `clip`, x0_hat is clipped to the data range [-1, 1] (the DDPM reference code's
    `clip_denoised`) and eps_hat recomputed from it, so x_t = sqrt(abar) x0_hat +
    sqrt(1 - abar) eps_hat still holds (diffusers' `use_clipped_model_output`). Near t = T an
    eps network's x0_hat divides by sqrt(abar_T) ~ 0.006: every error in eps_hat is magnified
    about 150 times, and unclipped it survives to the image as noise.

    Args:
        prediction: what `output` is: eps, v or x0.
        output, x_t: (B, C, H, W).
        sqrt_abar, sqrt_one_minus_abar: floats, or tensors broadcasting against x_t.
        clip: clip x0_hat to [-1, 1].

    Returns:
        (x0_hat, eps_hat), both (B, C, H, W).
    """
    if prediction == "eps":
        x0_hat, eps_hat = (x_t - sqrt_one_minus_abar * output) / sqrt_abar, output
    elif prediction == "v":  # Salimans & Ho 2022, sec. 4: x0 = a x_t - s v, eps = a v + s x_t
        x0_hat = sqrt_abar * x_t - sqrt_one_minus_abar * output
        eps_hat = sqrt_abar * output + sqrt_one_minus_abar * x_t
    elif prediction == "x0":
        x0_hat, eps_hat = output, (x_t - sqrt_abar * output) / sqrt_one_minus_abar
    else:
        check_prediction(prediction)
        raise AssertionError  # unreachable
    if clip:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
        eps_hat = (x_t - sqrt_abar * x0_hat) / sqrt_one_minus_abar
    return x0_hat, eps_hat


def loss_weight(
    weighting: str, prediction: str, snr: torch.Tensor, gamma: float = 5.0
) -> torch.Tensor:
    """Per-example weights of the squared error of the prediction.

    min_snr (Hang et al. 2023, eq. 9-10) makes every prediction's loss min(SNR, gamma) times
    the squared error of x0: the error of eps is SNR times that of x0, the error of v
    (SNR + 1) times, so the weights are min(SNR, gamma) / SNR, min(SNR, gamma) / (SNR + 1) and
    min(SNR, gamma).

    Args:
        weighting: uniform or min_snr.
        prediction: eps, v or x0.
        snr: (B,) SNR_t = abar_t / (1 - abar_t) of each example's timestep.
        gamma: the cap (5 in the paper).

    Returns:
        (B,) weights (all 1 for uniform).
    """
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {LOSS_WEIGHTINGS}")
    capped = snr.clamp(max=gamma)
    if prediction == "eps":
        return capped / snr
    if prediction == "v":
        return capped / (snr + 1)
    check_prediction(prediction)
    return capped
