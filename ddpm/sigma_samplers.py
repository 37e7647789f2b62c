"""Samplers on the noise level sigma (Karras et al. 2022, EDM): the probability-flow ODE
dx / dsigma = (x - D(x; sigma)) / sigma integrated on Karras steps (ddpm.edm.karras_sigmas)
from x = sigma_max z to sigma = 0, with any denoiser D (ddpm.edm): an EDM model, or a discrete
(DDPM) model seen on sigma.

- `euler`: Euler steps, N network calls (diffusers' EDMEulerScheduler).
- `heun`: EDM Algorithm 2: Heun's second-order steps, Euler on the last (to sigma = 0), so
  2N - 1 calls; with S_churn > 0 each step first adds noise to raise sigma by a factor
  1 + gamma (gamma = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma <= S_tmax), S_noise
  scaling that noise (Euler takes the same churn, as in k-diffusion and diffusers).
- `dpmpp_2m_karras`, `dpmpp_3m_karras`: DPM-Solver++ (Lu et al. 2022) multistep of order 2
  and 3 in the data prediction D, on lambda = -ln sigma; N calls. As diffusers'
  EDMDPMSolverMultistepScheduler (final sigma 0, lower_order_final): the first steps take the
  orders their history allows, the last step returns D itself, and under 15 steps the one
  before it is at most second order.

A sampler holds the math only: `sample(denoise, x, noise)` runs the whole trajectory, calling
denoise(x, sigma) -> D (same shape as x) and, for churn, noise() -> a standard Gaussian like
x. Everything is computed in x's dtype (float64 in DiffusionModel.sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from ddpm.config import SIGMA_SAMPLERS
from ddpm.edm import RHO, karras_sigmas

SigmaSamplerName = Literal["euler", "heun", "dpmpp_2m_karras", "dpmpp_3m_karras"]
# diffusers' lower_order_final: under this many steps the second-to-last step is at most
# second order (a third-order step there is unstable at few steps).
LOWER_ORDER_BELOW = 15

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


class SigmaSampler:
    """What the samplers on sigma share: the noise levels and the churn.

    Args:
        sigmas: the noise levels, descending, the last 0 (karras_sigmas).
        s_churn, s_tmin, s_tmax, s_noise: EDM Algorithm 2's stochasticity (0: deterministic).
    """

    def __init__(
        self,
        sigmas: list[float],
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
    ) -> None:
        if s_churn < 0 or s_noise < 0 or s_tmin > s_tmax:
            raise ValueError(
                f"need s_churn >= 0, s_noise >= 0 and s_tmin <= s_tmax, got {s_churn}, "
                f"{s_noise}, {s_tmin} and {s_tmax}"
            )
        self.sigmas = [float(s) for s in sigmas]
        self.steps = len(self.sigmas) - 1  # N
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    @property
    def stochastic(self) -> bool:
        """Whether sample takes fresh noise (churn somewhere on the steps)."""
        return any(self.gamma(s) > 0 for s in self.sigmas[:-1])

    @property
    def network_calls(self) -> int:
        return self.steps

    def gamma(self, sigma: float) -> float:
        """EDM Algorithm 2, line 4: gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <=
        sigma_i <= S_tmax, else 0."""
        if self.s_churn > 0 and self.s_tmin <= sigma <= self.s_tmax:
            return min(self.s_churn / self.steps, math.sqrt(2) - 1)
        return 0.0

    def churn(
        self, x: torch.Tensor, sigma: float, noise: Callable[[], torch.Tensor] | None
    ) -> tuple[torch.Tensor, float]:
        """EDM Algorithm 2, lines 5-6: sigma_hat = (1 + gamma) sigma and x_hat = x +
        sqrt(sigma_hat^2 - sigma^2) S_noise eps (x and sigma unchanged where gamma is 0)."""
        gamma = self.gamma(sigma)
        if gamma == 0 or noise is None:
            return x, sigma
        sigma_hat = sigma * (1 + gamma)
        return x + math.sqrt(sigma_hat**2 - sigma**2) * self.s_noise * noise(), sigma_hat

    def sample(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        noise: Callable[[], torch.Tensor] | None = None,
        progress: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Integrate from x at sigmas[0] to sigma = 0.

        Args:
            denoise: (x (B, C, H, W), sigma) -> D(x; sigma) (B, C, H, W).
            x: (B, C, H, W) the start, sigmas[0] times standard Gaussian noise.
            noise: () -> fresh standard Gaussian noise like x, for churn.
            progress: called after each network call.

        Returns:
            (B, C, H, W) the sample.
        """
        raise NotImplementedError


class Euler(SigmaSampler):
    """Euler steps of the ODE: x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (x_hat - D) /
    sigma_hat (EDM Algorithm 1 without its correction)."""

    def sample(self, denoise, x, noise=None, progress=None):  # type: ignore[no-untyped-def]
        for i in range(self.steps):
            x, sigma = self.churn(x, self.sigmas[i], noise)
            d = (x - denoise(x, sigma)) / sigma  # dx/dsigma
            x = x + (self.sigmas[i + 1] - sigma) * d
            if progress is not None:
                progress()
        return x


class Heun(SigmaSampler):
    """EDM Algorithm 2: Heun's method, with the Euler step's slope averaged with the slope at
    its end, except on the last step (its end is sigma = 0, where the slope is undefined)."""

    @property
    def network_calls(self) -> int:
        return 2 * self.steps - 1

    def sample(self, denoise, x, noise=None, progress=None):  # type: ignore[no-untyped-def]
        for i in range(self.steps):
            x_hat, sigma_hat = self.churn(x, self.sigmas[i], noise)
            sigma_next = self.sigmas[i + 1]
            d = (x_hat - denoise(x_hat, sigma_hat)) / sigma_hat  # line 7
            x = x_hat + (sigma_next - sigma_hat) * d  # line 8: the Euler step
            if progress is not None:
                progress()
            if sigma_next != 0:  # lines 9-11: the second-order correction
                d_next = (x - denoise(x, sigma_next)) / sigma_next
                x = x_hat + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)
                if progress is not None:
                    progress()
        return x


class DPMSolverPPMultistep(SigmaSampler):
    """DPM-Solver++(2M) or (3M) (Lu et al. 2022, Algorithm 2 and its third-order form) on
    sigma: alpha = 1 and lambda = -ln sigma, so with h = lambda_next - lambda_i,

        x_next = (sigma_next / sigma_i) x - (e^{-h} - 1) (D0 - 1/2 D1)              (2M)
        x_next = (sigma_next / sigma_i) x - (e^{-h} - 1) D0
                 + ((e^{-h} - 1) / h + 1) D1 - ((e^{-h} - 1 + h) / h^2 - 1/2) D2     (3M)

    with D0 = D(x_i; sigma_i) and D1, D2 the divided differences of the last denoised values
    in lambda (diffusers' multistep_dpm_solver_{second,third}_order_update, midpoint form).

    Args:
        order: 2 or 3.
    """

    def __init__(self, sigmas: list[float], order: int, **churn: float) -> None:
        super().__init__(sigmas, **churn)
        if order not in (2, 3):
            raise ValueError(f"DPM-Solver++ order must be 2 or 3, got {order}")
        if self.stochastic:
            raise ValueError("DPM-Solver++ is deterministic: it takes no churn (s_churn 0)")
        self.order = order

    def _order(self, i: int) -> int:
        """The order of step i: what the history allows, at most second order just before the
        last step when there are few, first order (D itself) on the last."""
        if i == self.steps - 1:
            return 1
        order = min(self.order, i + 1)
        if i == self.steps - 2 and self.steps < LOWER_ORDER_BELOW:
            order = min(order, 2)
        return order

    def sample(self, denoise, x, noise=None, progress=None):  # type: ignore[no-untyped-def]
        history: list[tuple[torch.Tensor, float]] = []  # (D, lambda) of earlier steps, newest last
        for i in range(self.steps):
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            d0, lam = denoise(x, sigma), -math.log(sigma)
            if progress is not None:
                progress()
            order = self._order(i)
            if sigma_next == 0:  # to sigma = 0: e^{-h} = sigma_next / sigma = 0, x_next = D0
                x = d0
            else:
                h = -math.log(sigma_next) - lam
                phi = math.expm1(-h)  # e^{-h} - 1
                x = (sigma_next / sigma) * x - phi * d0
                if order >= 2:
                    d1_0 = (d0 - history[-1][0]) / ((lam - history[-1][1]) / h)  # (m0 - m1) / r0
                    if order == 2:
                        x = x - 0.5 * phi * d1_0
                    else:
                        r0, r1 = (lam - history[-1][1]) / h, (history[-1][1] - history[-2][1]) / h
                        d1_1 = (history[-1][0] - history[-2][0]) / r1
                        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                        d2 = (d1_0 - d1_1) / (r0 + r1)
                        x = x + (phi / h + 1) * d1 - ((phi + h) / h**2 - 0.5) * d2
            history = [*history, (d0, lam)][-2:]
        return x


def make_sigma_sampler(
    name: str, steps: int, sigma_min: float, sigma_max: float, rho: float = RHO, **churn: float
) -> SigmaSampler:
    """A sampler on sigma by name, on `steps` Karras steps from sigma_max to sigma_min (then 0);
    churn: s_churn, s_tmin, s_tmax, s_noise (SigmaSampler).

    Raises:
        ValueError: for an unknown name or bad steps, range, rho or churn.
    """
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    if name == "euler":
        return Euler(sigmas, **churn)
    if name == "heun":
        return Heun(sigmas, **churn)
    if name in ("dpmpp_2m_karras", "dpmpp_3m_karras"):
        return DPMSolverPPMultistep(sigmas, 2 if name == "dpmpp_2m_karras" else 3, **churn)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SIGMA_SAMPLERS}")
