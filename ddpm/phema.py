"""Post-hoc EMA (Karras et al. 2024, EDM2, sec. 3 and Appendix C): choose a model's EMA length
after training, by measurement.

A power-function EMA averages the weights of steps 1..t with weight proportional to k^gamma:
its update at step k is ema <- beta_k ema + (1 - beta_k) weights with beta_k = (1 - 1/k)^(gamma +
1) (EDM2 eq. 127, one step per update), so it has no fixed decay and its length grows with the
run. Its length is sigma_rel, the profile's standard deviation relative to t:
sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (eq. 123).

During training two such averages (sigma_rel 0.05 and 0.10, EDM2's) are snapshotted now and
then. Any other profile (t, sigma_rel) is then approximated by the combination of snapshots
whose profiles are closest to it in least squares (Algorithm 3): with the inner products of
the profiles in closed form (eq. 151), the coefficients solve A x = b, A the snapshots' Gram
matrix and b their products with the target, normalised to sum to 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "PROFILES", "gamma_to_sigma_rel", "power_decay", "profile_overlap", "reconstruct",
    "sigma_rel_to_gamma", "solve_coefficients",
]  # fmt: skip

PROFILES = (0.05, 0.10)  # EDM2's two tracked sigma_rel


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel of the power-function profile of exponent gamma (EDM2 eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma whose profile has this sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (EDM2 eq. 126, Algorithm 2).

    Raises:
        ValueError: unless 0 < sigma_rel < sqrt(1/12) (gamma > 0; 1/12 is the uniform
            average's, gamma = 0).
    """
    if not 0 < sigma_rel < math.sqrt(1 / 12):
        raise ValueError(f"sigma_rel must be in (0, {math.sqrt(1 / 12):.4f}), got {sigma_rel}")
    inverse = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inverse, 12.0 - inverse])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_decay(gamma: float, k: torch.Tensor | int) -> torch.Tensor | float:
    """beta_k = (1 - 1/k)^(gamma + 1): the decay of update k (from 1; 0 at k = 1, a copy)."""
    if isinstance(k, torch.Tensor):
        return (1.0 - 1.0 / k.double()).clamp(min=0.0).pow(gamma + 1).float()
    return (1.0 - 1.0 / k) ** (gamma + 1)


def profile_overlap(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """The inner product of two normalised power-function profiles, p(tau) = (gamma + 1)
    tau^gamma / t^(gamma + 1) on [0, t], ending at t_a and t_b (EDM2 eq. 151)."""
    low, high = min(t_a, t_b), max(t_a, t_b)
    exponent = gamma_b if t_a < t_b else gamma_a  # the longer profile's, over the shorter one
    return (
        (gamma_a + 1) * (gamma_b + 1) * (low / high) ** exponent / ((gamma_a + gamma_b + 1) * high)
    )


def solve_coefficients(
    snapshots: Sequence[tuple[float, float]], target: tuple[float, float]
) -> list[float]:
    """The least-squares combination of snapshot profiles closest to a target profile.

    Args:
        snapshots: (t, sigma_rel) of each snapshot: the step it was taken at, its profile.
        target: (t, sigma_rel) wanted, t at most the last snapshot's.

    Returns:
        one coefficient per snapshot, summing to 1 (EDM2 Algorithm 3).
    """
    ins = [(t, sigma_rel_to_gamma(s)) for t, s in snapshots]
    out_t, out_gamma = target[0], sigma_rel_to_gamma(target[1])
    gram = np.array([[profile_overlap(ta, ga, tb, gb) for tb, gb in ins] for ta, ga in ins])
    wanted = np.array([profile_overlap(ta, ga, out_t, out_gamma) for ta, ga in ins])
    x = np.linalg.solve(gram, wanted)
    return (x / x.sum()).tolist()


def reconstruct(
    weights: Sequence[Mapping[str, torch.Tensor]], coefficients: Sequence[float]
) -> dict[str, torch.Tensor]:
    """sum_i c_i weights_i, tensor by tensor, accumulated in float64 (the coefficients of
    neighbouring snapshots are large and of opposite signs), returned in each tensor's dtype;
    tensors that are not floating point (counters) are the last snapshot's."""
    if len(weights) != len(coefficients) or not weights:
        raise ValueError(f"{len(weights)} snapshots for {len(coefficients)} coefficients")
    out = {}
    for name, last in weights[-1].items():
        if not last.is_floating_point():
            out[name] = last.clone()
            continue
        total = torch.zeros_like(last, dtype=torch.float64)
        for state, c in zip(weights, coefficients, strict=True):
            total += c * state[name].double()
        out[name] = total.to(last.dtype)
    return out
