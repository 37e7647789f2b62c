"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): diffusion written on the noise level sigma alone, and the DDPM (VP) model seen on it.

An image y with noise of level sigma is x = y + sigma n, n ~ N(0, I) (EDM eq. 1-2, the
variance-exploding form). A denoiser D(x; sigma) estimates y; every sampler of
ddpm.sigma_samplers needs nothing else.

- The EDM formulation (`diffusion.formulation edm`) wraps the network F as EDM Table 1's
  preconditioning: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), with sigma_data the
  data's standard deviation (0.5 for CIFAR-10 in [-1, 1]). It trains on ln sigma ~ N(P_mean,
  P_std^2) with the loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
  (EDM sec. 5, Table 1; NVlabs/edm training/loss.py EDMLoss).
- The discrete formulation's x_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps is x / sqrt(1 +
  sigma^2) at sigma_t = sqrt((1 - abar_t) / abar_t) (EDM Table 1, VP; k-diffusion and
  diffusers' use_karras_sigmas), so its network is a denoiser on sigma too (see
  DiffusionModel.denoise), at a fractional timestep between the schedule's two nearest sigmas.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "P_MEAN",
    "P_STD",
    "SIGMA_DATA",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "EDMParams",
    "edm_training_target",
    "karras_sigmas",
    "measure_sigma_data",
    "precondition",
    "sigma_to_t",
    "vp_sigmas",
]  # fmt: skip

# EDM Table 1 ("Ours"), CIFAR-10.
SIGMA_DATA = 0.5  # the data's standard deviation, when it is not measured
P_MEAN, P_STD = -1.2, 1.2  # the training sigma: ln sigma ~ N(P_mean, P_std^2)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # the sampling range
RHO = 7.0  # the Karras steps' exponent (EDM eq. 5)


@dataclass(frozen=True)
class EDMParams:
    """What an EDM model trains with: the data's standard deviation and the training noise
    distribution, ln sigma ~ N(p_mean, p_std^2) (EDM Table 1's values by default)."""

    sigma_data: float = SIGMA_DATA
    p_mean: float = P_MEAN
    p_std: float = P_STD


def precondition(
    sigma: torch.Tensor | float, sigma_data: float
) -> tuple[torch.Tensor | float, ...]:
    """EDM's preconditioning (Table 1, "Ours"; NVlabs/edm EDMPrecond).

    Args:
        sigma: the noise level, a float or a tensor broadcasting against the images
            ((B, 1, 1, 1)).
        sigma_data: the data's standard deviation.

    Returns:
        (c_skip, c_out, c_in, c_noise): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with
        c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data /
        sqrt(sigma^2 + sigma_data^2), c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise =
        ln(sigma) / 4.
    """
    if isinstance(sigma, torch.Tensor):
        root = (sigma.square() + sigma_data**2).sqrt()
        c_noise = sigma.log() / 4
    else:
        root = math.sqrt(sigma**2 + sigma_data**2)
        c_noise = math.log(sigma) / 4
    return sigma_data**2 / root**2, sigma * sigma_data / root, 1 / root, c_noise


def edm_training_target(
    y: torch.Tensor, n: torch.Tensor, sigma: torch.Tensor, sigma_data: float
) -> torch.Tensor:
    """What F is trained to output at x = y + sigma n (EDM eq. 8, solved for F).

    EDM's loss lambda(sigma) ||D(x; sigma) - y||^2 with lambda = 1 / c_out^2 is exactly
    ||F - (y - c_skip x) / c_out||^2, and (y - c_skip x) / c_out = (sigma / sigma_data y -
    sigma_data n) / sqrt(sigma^2 + sigma_data^2): written so, nothing cancels at small sigma
    (D - y is a difference of two numbers near y there). With sigma_data = 1 it is -v.

    Args:
        y, n: (B, C, H, W) clean images and standard Gaussian noise.
        sigma: (B, 1, 1, 1) noise levels.

    Returns:
        (B, C, H, W) the target of F.
    """
    return (sigma / sigma_data * y - sigma_data * n) / (sigma.square() + sigma_data**2).sqrt()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = RHO) -> list[float]:
    """EDM eq. 5: `steps` noise levels from sigma_max down to sigma_min, evenly spaced in
    sigma^(1/rho), then 0 (the clean image), as floats (float64).

    Raises:
        ValueError: unless steps >= 1, 0 < sigma_min <= sigma_max and rho > 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min} and {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    ramp = [i / (steps - 1) for i in range(steps)] if steps > 1 else [0.0]
    return [(high + r * (low - high)) ** rho for r in ramp] + [0.0]


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """(T,) float64 sigma_t = sqrt((1 - abar_t) / abar_t) of a discrete schedule, increasing
    in t (EDM Table 1, VP)."""
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


def sigma_to_t(sigma: float, log_sigmas: Sequence[float]) -> float:
    """The fractional timestep of a noise level: linear in ln sigma between the schedule's two
    nearest timesteps, clamped to [0, T-1] (k-diffusion's DiscreteSchedule.sigma_to_t,
    diffusers' _sigma_to_t).

    Args:
        sigma: a noise level > 0.
        log_sigmas: the T values ln sigma_t, increasing (floats: a sampler calls this at every
            step, and a tensor would be read back from it each time).
    """
    s = math.log(sigma)
    if s <= log_sigmas[0]:
        return 0.0
    if s >= log_sigmas[-1]:
        return float(len(log_sigmas) - 1)
    high = bisect.bisect_right(log_sigmas, s)
    low = high - 1
    return low + (s - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])


def measure_sigma_data(images: torch.Tensor) -> float:
    """The data's standard deviation in [-1, 1] (EDM's sigma_data), rounded to 4 digits so a
    resumed run measures the very same value.

    Args:
        images: (N, C, H, W) uint8 images.
    """
    x = images.double() / 127.5 - 1
    return round(float(x.std()), 4)
