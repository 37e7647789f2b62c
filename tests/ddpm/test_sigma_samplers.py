"""The samplers on sigma (ddpm.sigma_samplers) and EDM's preconditioning (ddpm.edm), step for
step in float64 against diffusers' EDM schedulers over whole trajectories, Heun against EDM's
Algorithm 2 written out here, and the discrete model on sigma against diffusers'
EulerDiscreteScheduler with Karras sigmas."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
)

from ddpm.diffusion import DiffusionModel
from ddpm.edm import EDMParams, karras_sigmas, precondition, sigma_to_t, vp_sigmas
from ddpm.sigma_samplers import LOWER_ORDER_BELOW, make_sigma_sampler

SIGMA_DATA = 0.5
TOLERANCE = 1e-6  # the bound on whole trajectories


def mixer() -> torch.Tensor:
    """A fixed (3, 3) channel mixing for the test network."""
    return torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 2


A = mixer()


def network(x_in: torch.Tensor, time: torch.Tensor | float) -> torch.Tensor:
    """A smooth nonlinear stand-in for F: mixes channels and pixels and reads its time input."""
    mixed = torch.einsum("ij,bjhw->bihw", A, x_in)
    return torch.tanh(mixed + time) + 0.3 * x_in.roll(1, -1)


def edm_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """D(x; sigma) of the test network under ddpm.edm's preconditioning."""
    c_skip, c_out, c_in, c_noise = precondition(sigma, SIGMA_DATA)
    return c_skip * x + c_out * network(c_in * x, c_noise)


def start(seed: int = 0) -> torch.Tensor:
    """(2, 3, 4, 4) float64 standard Gaussian noise."""
    return torch.randn(
        2, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def gaussian(generator: torch.Generator):  # type: ignore[no-untyped-def]
    """() -> fresh (2, 3, 4, 4) float64 standard Gaussian noise from generator."""
    return lambda: torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)


def churn_options(churn: tuple[float, ...]) -> dict[str, float]:
    """(S_churn, S_tmin, S_tmax, S_noise) as make_sigma_sampler's keywords."""
    return dict(zip(("s_churn", "s_tmin", "s_tmax", "s_noise"), churn, strict=True))


def run_diffusers(scheduler, sigmas: list[float], z: torch.Tensor, **step) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """A diffusers EDM scheduler's whole trajectory from sigma_max z, on our float64 sigmas
    (its own are float32; their agreement is tested apart), its network the test network."""
    scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float64)
    scheduler.timesteps = 0.25 * scheduler.sigmas[:-1].log()  # its c_noise
    x = sigmas[0] * z  # not init_noise_sigma z: that is sqrt(sigma_max^2 + 1)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)  # c_in x
        x = scheduler.step(network(x_in, t), t, x, **step).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 2, 5, 18, 40])
@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_karras_sigmas_are_diffusers(steps: int, rho: float) -> None:
    """EDM eq. 5's noise levels equal diffusers' (computed in float32 there), ending at 0."""
    ours = karras_sigmas(steps, 0.002, 80.0, rho)
    scheduler = EDMEulerScheduler(sigma_data=SIGMA_DATA, rho=rho)
    scheduler.set_timesteps(steps)
    theirs = scheduler.sigmas.double()
    assert len(ours) == steps + 1 and ours[-1] == 0.0 and ours[0] == pytest.approx(80.0)
    assert torch.allclose(torch.tensor(ours, dtype=torch.float64), theirs, rtol=2**-22, atol=0)


def test_edm_preconditioning_is_diffusers() -> None:
    """c_skip x + c_out F(c_in x; c_noise) is diffusers' precondition_inputs/_noise/_outputs."""
    scheduler = EDMEulerScheduler(sigma_data=SIGMA_DATA)
    x = start()
    for sigma in (0.002, 0.3, 1.0, 80.0):
        s = torch.tensor(sigma, dtype=torch.float64)
        x_in = scheduler.precondition_inputs(x, s)
        c_noise = scheduler.precondition_noise(s)
        theirs = scheduler.precondition_outputs(x, network(x_in, c_noise), s)
        assert (edm_denoiser(x, sigma) - theirs).abs().max() <= 1e-14


@pytest.mark.parametrize("steps", [2, 5, 18])
def test_euler_is_diffusers_edm_euler(steps: int) -> None:
    """Euler over a whole trajectory equals EDMEulerScheduler (which rounds x to float32 in
    each step, so within TOLERANCE rather than to the last bit)."""
    sigmas = karras_sigmas(steps, 0.002, 80.0)
    theirs = run_diffusers(EDMEulerScheduler(sigma_data=SIGMA_DATA), sigmas, start())
    ours = make_sigma_sampler("euler", steps, 0.002, 80.0).sample(edm_denoiser, 80.0 * start())
    assert (ours - theirs).abs().max() <= TOLERANCE


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, LOWER_ORDER_BELOW - 1, LOWER_ORDER_BELOW, 25])
def test_dpm_solver_pp_is_diffusers_edm_dpm_solver(order: int, steps: int) -> None:
    """DPM-Solver++(2M) and (3M) on Karras steps equal EDMDPMSolverMultistepScheduler of that
    solver order over a whole trajectory, including its lower orders at the start and end."""
    sigmas = karras_sigmas(steps, 0.002, 80.0)
    scheduler = EDMDPMSolverMultistepScheduler(sigma_data=SIGMA_DATA, solver_order=order)
    scheduler.set_timesteps(steps)
    theirs = run_diffusers(scheduler, sigmas, start())
    name = f"dpmpp_{order}m_karras"
    ours = make_sigma_sampler(name, steps, 0.002, 80.0).sample(edm_denoiser, 80.0 * start())
    assert (ours - theirs).abs().max() <= TOLERANCE


def edm_algorithm_2(denoise, sigmas, x, churn, noise, second_order=True):  # type: ignore[no-untyped-def]
    """EDM Algorithm 2 as printed (Karras et al. 2022, p. 7), written apart from the product;
    without its lines 9-11 (second_order False) the Euler sampler with the same churn."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    n = len(sigmas) - 1
    for i in range(n):
        t_i, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= t_i <= s_tmax else 0.0
        t_hat = t_i + gamma * t_i
        if gamma > 0:
            x = x + (t_hat**2 - t_i**2) ** 0.5 * s_noise * noise()
        d = (x - denoise(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if t_next != 0 and second_order:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


@pytest.mark.parametrize("churn", [(0.0, 0.0, math.inf, 1.0), (40.0, 0.05, 50.0, 1.003)])
@pytest.mark.parametrize("steps", [1, 4, 18])
def test_heun_is_edm_algorithm_2(churn: tuple[float, ...], steps: int) -> None:
    """Heun (with and without churn) is EDM's Algorithm 2, with 2N - 1 network calls."""
    sigmas = karras_sigmas(steps, 0.002, 80.0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    calls = []

    def counted(x: torch.Tensor, sigma: float) -> torch.Tensor:
        calls.append(sigma)
        return edm_denoiser(x, sigma)

    expected = edm_algorithm_2(edm_denoiser, sigmas, 80.0 * start(), churn, gaussian(g1))
    sampler = make_sigma_sampler("heun", steps, 0.002, 80.0, **churn_options(churn))
    ours = sampler.sample(counted, 80.0 * start(), gaussian(g2))
    assert (ours - expected).abs().max() <= TOLERANCE
    assert len(calls) == sampler.network_calls == 2 * steps - 1
    assert sampler.stochastic == (churn[0] > 0 and steps > 1)  # one step: sigma_max > S_tmax


def test_sigma_to_t_is_diffusers() -> None:
    """The fractional timestep of a noise level is diffusers' _sigma_to_t (log-sigma
    interpolation), clamped at the schedule's ends."""
    scheduler = EulerDiscreteScheduler(beta_schedule="squaredcos_cap_v2")
    log_sigmas = vp_sigmas(
        torch.tensor(scheduler.alphas_cumprod.tolist(), dtype=torch.float64)
    ).log()
    for sigma in (1e-4, 0.03, 0.5, 1.0, 7.5, 150.0, 1e5):
        wide = torch.tensor([sigma], dtype=torch.float64).numpy()
        theirs = float(scheduler._sigma_to_t(wide, log_sigmas.numpy())[0])
        assert sigma_to_t(sigma, log_sigmas.tolist()) == pytest.approx(theirs, abs=1e-9)


class ScaledTime(torch.nn.Module):
    """The test network as a module: the product feeds it (t + 1) / T, diffusers t itself."""

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return network(x.double(), time.double()[:, None, None, None]).float()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_a_discrete_model_on_sigma_is_diffusers_euler_with_karras_sigmas(prediction: str) -> None:
    """A discrete (DDPM) model sampled on Karras sigmas equals diffusers' EulerDiscreteScheduler
    with use_karras_sigmas (fractional timesteps, the schedule's own sigma range): x_t = x /
    sqrt(1 + sigma^2), and its output read as eps, v or x0."""
    T, steps = 1000, 10
    model = DiffusionModel(ScaledTime(), num_timesteps=T, schedule="cosine", prediction=prediction)
    kind = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction]
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", prediction_type=kind,
        use_karras_sigmas=True, timestep_spacing="linspace",
    )  # fmt: skip
    scheduler.set_timesteps(steps)
    low, high = model.sigma_range()
    sigmas = karras_sigmas(steps, low, high)
    # diffusers' schedule is float32: abar_0 carries an error of 2^-24, which is a share
    # 2^-24 / (1 - abar_0) of sigma_0^2 (ours is float64).
    rtol = 2**-24 / (1 - float(model.alphas_cumprod_f64[0]))
    theirs_sigmas = scheduler.sigmas.double()
    assert torch.allclose(
        torch.tensor(sigmas, dtype=torch.float64), theirs_sigmas, rtol=rtol, atol=0
    )
    scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float64)
    scheduler.timesteps = torch.tensor([sigma_to_t(s, model.log_sigmas) for s in sigmas[:-1]])
    x = sigmas[0] * start()
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        output = network(x_in, (t + 1) / T)
        x = scheduler.step(output, t, x).prev_sample
    sampler = make_sigma_sampler("euler", steps, low, high)
    ours = sampler.sample(lambda x, s: model.denoise(x, s), sigmas[0] * start())
    # The product hands its network float32 (as on every device), this loop float64: relative
    # to the trajectory's scale (a stand-in eps network's x0 estimates reach 1e5).
    assert (ours - x).abs().max() <= TOLERANCE * max(1.0, float(x.abs().max()))


@pytest.mark.parametrize("formulation", ["discrete", "edm"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m_karras", "dpmpp_3m_karras"])
def test_every_sampler_on_sigma_draws_images_of_either_formulation(
    formulation: str, sampler: str
) -> None:
    """DiffusionModel.sample takes every sampler on sigma for both formulations: finite images
    in [-1, 1], the same for the same seed, the network called as often as promised."""
    from ddpm.unet import UNet

    torch.manual_seed(0)
    edm = EDMParams() if formulation == "edm" else None
    model = DiffusionModel(UNet(3, 3, 8), num_timesteps=50, edm=edm)
    calls = []
    model.eps_model.register_forward_hook(lambda *args: calls.append(1))
    draw = [model.sample(2, (3, 32, 32), sampler, steps=3,
                         generator=torch.Generator().manual_seed(7)) for _ in range(2)]  # fmt: skip
    assert torch.equal(draw[0], draw[1]) and draw[0].isfinite().all()
    assert draw[0].abs().max() <= 1.0
    assert len(calls) == 2 * (5 if sampler == "heun" else 3)


def test_an_edm_model_refuses_the_timestep_samplers() -> None:
    """An edm model has no timesteps: ddpm, ddim and dpmpp_2m are refused naming the samplers
    that work."""
    from ddpm.unet import UNet

    model = DiffusionModel(UNet(3, 3, 8), num_timesteps=50, edm=EDMParams())
    for name in ("ddpm", "ddim", "dpmpp_2m"):
        with pytest.raises(ValueError, match="heun"):
            model.sample(1, (3, 32, 32), name, steps=3)


def test_euler_with_churn_is_edm_algorithm_2_without_its_correction() -> None:
    """With S_churn, S_tmin, S_tmax and S_noise, Euler raises sigma and adds noise as EDM's
    Algorithm 2 does (diffusers' EDMEulerScheduler is no reference here: it applies the churn
    after the network has seen the sample without it)."""
    churn = (10.0, 0.05, 50.0, 1.007)
    sigmas = karras_sigmas(12, 0.002, 80.0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    expected = edm_algorithm_2(
        edm_denoiser, sigmas, 80.0 * start(), churn, gaussian(g1), second_order=False
    )
    sampler = make_sigma_sampler("euler", 12, 0.002, 80.0, **churn_options(churn))
    ours = sampler.sample(edm_denoiser, 80.0 * start(), gaussian(g2))
    assert sampler.stochastic and (ours - expected).abs().max() <= TOLERANCE
