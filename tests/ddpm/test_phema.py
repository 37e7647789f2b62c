"""Post-hoc EMA (ddpm.phema, EDM2): the gamma <-> sigma_rel conversion and the profiles' inner
products agree with their definitions computed numerically here, the power-function EMA
averages as its profile says, and a reconstruction from snapshots of two tracked profiles
matches a third profile tracked directly through the same run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.phema import (
    gamma_to_sigma_rel,
    power_decay,
    profile_overlap,
    reconstruct,
    sigma_rel_to_gamma,
    solve_coefficients,
)
from ddpm.training import EMA


def profile(t: int, gamma: float) -> np.ndarray:
    """The weights a power-function EMA ending at step t gives steps 1..t, by running its
    recursion (EDM2 eq. 127) on unit vectors: (t,) summing to 1."""
    w = np.zeros(t)
    for k in range(1, t + 1):
        w *= power_decay(gamma, k)
        w[k - 1] += 1 - power_decay(gamma, k)
    return w


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.15, 0.25, 0.28])
def test_sigma_rel_and_gamma_convert_both_ways_and_mean_the_profiles_spread(
    sigma_rel: float,
) -> None:
    """gamma_to_sigma_rel inverts sigma_rel_to_gamma, and sigma_rel is the standard deviation
    of the EMA's weights over the steps, relative to their number (EDM2 eq. 123), measured on
    the recursion over 20,000 steps."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0 and gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    t = 20_000
    w = profile(t, gamma)
    tau = np.arange(1, t + 1) / t
    mean = (w * tau).sum()
    spread = math.sqrt((w * (tau - mean) ** 2).sum())
    assert spread == pytest.approx(sigma_rel, rel=2e-3)


def test_sigma_rel_out_of_range_is_refused() -> None:
    """sigma_rel at or past the uniform average's sqrt(1/12), or not positive, has no gamma."""
    for bad in (0.0, -0.1, math.sqrt(1 / 12), 0.5):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize(("t_a", "s_a", "t_b", "s_b"), [
    (4000, 0.05, 4000, 0.10), (1000, 0.05, 4000, 0.05), (4000, 0.10, 1500, 0.05),
    (2500, 0.20, 3000, 0.02),
])  # fmt: skip
def test_profile_overlap_is_the_inner_product_of_the_recursions_weights(
    t_a: int, s_a: float, t_b: int, s_b: float
) -> None:
    """profile_overlap (EDM2 eq. 151, continuous time) equals the inner product of the two
    EMAs' weights over the steps, times the steps' spacing, to the discretisation's order."""
    g_a, g_b = sigma_rel_to_gamma(s_a), sigma_rel_to_gamma(s_b)
    a, b = profile(t_a, g_a), profile(t_b, g_b)
    n = min(t_a, t_b)
    numeric = float((a[:n] * b[:n]).sum())  # per step: the continuous densities times 1 step
    assert profile_overlap(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=5e-3)
    assert profile_overlap(t_a, g_a, t_b, g_b) == pytest.approx(profile_overlap(t_b, g_b, t_a, g_a))


def test_the_solve_reproduces_a_tracked_profile_exactly() -> None:
    """Asked for the profile of one of its snapshots, the least-squares solve puts all the
    weight on that snapshot."""
    snapshots = [(t, s) for t in (500, 1000, 1500, 2000) for s in (0.05, 0.10)]
    x = solve_coefficients(snapshots, (1500, 0.10))
    assert x[snapshots.index((1500, 0.10))] == pytest.approx(1.0, abs=1e-6)
    assert sum(abs(c) for i, c in enumerate(x) if snapshots[i] != (1500, 0.10)) < 1e-6


def test_a_reconstructed_ema_matches_one_tracked_directly() -> None:
    """Weights wandering as training moves them (a drift plus noise, 4,000 steps), two
    power-function EMAs (sigma_rel 0.05 and 0.10) snapshotted every 250 steps, and a third
    (0.07) tracked directly: the reconstruction of 0.07 at the last step from the snapshots
    is within 1e-3 of it, relative to its norm, and much closer to it than to the weights
    or to either tracked profile."""
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 16)
    tracked = {s: EMA(net, 0.0, gamma=sigma_rel_to_gamma(s)) for s in (0.05, 0.10, 0.07)}
    drift = torch.randn(16, 16) * 0.01
    snapshots, states = [], []
    for step in range(1, 4001):
        with torch.no_grad():
            net.weight += drift + 0.05 * torch.randn(16, 16)
            net.bias += 0.05 * torch.randn(16)
        for ema in tracked.values():
            ema.update_parameters(net)
        if step % 250 == 0:
            for s in (0.05, 0.10):
                snapshots.append((step, s))
                states.append({k: v.clone() for k, v in tracked[s].module.state_dict().items()})
    x = solve_coefficients(snapshots, (4000, 0.07))
    rebuilt = reconstruct(states, x)
    direct = tracked[0.07].module.state_dict()

    def distance(a: dict, b: dict) -> float:
        return math.sqrt(sum(float((a[k] - b[k]).double().square().sum()) for k in a))

    norm = math.sqrt(sum(float(v.double().square().sum()) for v in direct.values()))
    assert distance(rebuilt, direct) <= 1e-3 * norm
    for other in (net.state_dict(), tracked[0.05].module.state_dict(),
                  tracked[0.10].module.state_dict()):  # fmt: skip
        assert distance(rebuilt, direct) < 0.1 * distance(other, direct)


def test_a_power_ema_starts_as_a_copy_and_follows_its_decays() -> None:
    """The first update copies the weights; update k applies (1 - 1/k)^(gamma + 1); a
    skipped step (taken False) changes nothing."""
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, 0.0, gamma=6.94)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update_parameters(net)
    assert torch.equal(ema.module.weight, net.weight)
    with torch.no_grad():
        net.weight.fill_(5.0)
    ema.update_parameters(net, taken=torch.tensor(False))
    assert torch.equal(ema.module.weight, torch.full((2, 2), 3.0))
    ema.update_parameters(net)
    beta = (1 - 1 / 2) ** 7.94
    assert torch.allclose(ema.module.weight, torch.full((2, 2), beta * 3 + (1 - beta) * 5))
