"""Diffusion math: schedule pins, the forward process, the loss and its weighting, the
prediction targets, and sampling.

Several tests drive DiffusionModel with an exact predictor for Gaussian data x0 ~ N(0, s^2 I),
for which the optimal outputs and the probability-flow ODE have closed forms:
eps*(x_t) = sqrt(1 - abar_t) x_t / (abar_t s^2 + 1 - abar_t),
x0*(x_t) = sqrt(abar_t) s^2 x_t / (abar_t s^2 + 1 - abar_t), v* = sqrt(abar) eps* -
sqrt(1 - abar) x0*, and the ODE maps x_T to x0 = s / std_T * x_T with
std_T^2 = abar_T s^2 + 1 - abar_T.
"""

import copy
import statistics

import pytest
import torch
from tiny_run import smooth_batch
from torch import nn

from ddpm.diffusion import DiffusionModel
from ddpm.noise import _same_device
from ddpm.samplers import DDIM, Ancestral, ddim_timesteps
from ddpm.schedules import (
    linear_beta_schedule,
    loss_weight,
    named_betas,
    prediction_target,
    schedule_constants,
    split_prediction,
)
from ddpm.trainer import train_step
from ddpm.training import TrainingState
from ddpm.unet import UNet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Recorder(nn.Module):
    """An eps model that predicts zero noise and records what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.device == self.anchor.device and t.device == self.anchor.device
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return torch.zeros_like(x) + 0 * self.anchor


class GaussianOracle(nn.Module):
    """The exact predictor (eps, v or x0) for data x0 ~ N(0, s^2 I) under a given schedule."""

    def __init__(self, alphas_cumprod: torch.Tensor, s: float, prediction: str = "eps") -> None:
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.double())
        self.s, self.prediction = s, prediction

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        index = (t.double() * len(self.abar)).round().long() - 1  # (t + 1) / T -> t
        abar = self.abar[index].reshape(-1, 1, 1, 1)
        total = abar * self.s**2 + 1 - abar
        eps = (1 - abar).sqrt() * x.double() / total
        x0 = abar.sqrt() * self.s**2 * x.double() / total
        out = prediction_target(self.prediction, x0, eps, abar.sqrt(), (1 - abar).sqrt())
        return out.to(x.dtype)


def oracle_model(
    s: float = 0.3, num_timesteps: int = 1000, schedule: str = "linear", prediction: str = "eps"
) -> DiffusionModel:
    betas = named_betas(schedule, num_timesteps)
    return DiffusionModel(
        GaussianOracle(schedule_constants(betas)["alphas_cumprod"], s, prediction),
        num_timesteps=num_timesteps,
        schedule=schedule,
        prediction=prediction,
    )


# ---- schedule -------------------------------------------------------------------------------


def test_posterior_variance_pin_at_t487() -> None:
    """Linear 1e-4..0.02, T=1000: posterior variance at t=487 is 0.00979 (diffusers' pin)."""
    model = DiffusionModel(Recorder())
    assert model.posterior_variance[487].item() == pytest.approx(0.00979, abs=1e-5)


def test_alphas_cumprod_strictly_decreasing_and_float32() -> None:
    """abar_t decreases strictly from ~1 to ~0; buffers are float32, computed in float64."""
    model = DiffusionModel(Recorder())
    abar = model.alphas_cumprod
    assert abar.dtype == torch.float32
    assert torch.all(abar[1:] < abar[:-1])
    assert abar[0].item() == pytest.approx(1 - 1e-4)
    assert abar[-1].item() < 1e-4
    exact = linear_beta_schedule(1e-4, 0.02, 1000)["alphas_cumprod"]
    assert exact.dtype == torch.float64
    torch.testing.assert_close(abar, exact.float())


@pytest.mark.parametrize("betas", [(0.02, 1e-4), (0.0, 0.02), (1e-4, 1.0)])
def test_bad_betas_fail_clearly(betas: tuple[float, float]) -> None:
    """Betas out of order or out of (0, 1) are refused with a message saying the rule."""
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        DiffusionModel(Recorder(), betas)


# ---- forward process and loss ---------------------------------------------------------------


def test_x_t_keeps_unit_variance_at_every_t() -> None:
    """Regression (wrong noise coefficient): unit-variance x0 gives unit-variance x_t, all t."""
    model = DiffusionModel(Recorder())
    torch.manual_seed(0)
    t = torch.arange(1000)
    x0, eps = torch.randn(1000, 1, 128, 128), torch.randn(1000, 1, 128, 128)
    variance = model.q_sample(x0, t, eps).flatten(1).var(dim=1)
    assert torch.all((variance - 1).abs() < 0.06), variance.min().item()


def test_training_noise_is_standard_gaussian() -> None:
    """Regression (uniform noise): the noise the loss targets is N(0, 1), not U[0, 1)."""
    recorder = Recorder()
    model = DiffusionModel(recorder)
    torch.manual_seed(0)
    loss = model(torch.zeros(64, 3, 32, 32))  # x0 = 0 -> x_t = sqrt(1 - abar_t) eps
    ((x_t, t_net),) = recorder.calls
    t = (t_net * 1000).round().long() - 1
    eps = x_t / model.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert abs(eps.mean().item()) < 0.02
    assert eps.std().item() == pytest.approx(1.0, abs=0.02)
    kurtosis = (eps**4).mean().item() / eps.var().item() ** 2
    assert kurtosis == pytest.approx(3.0, abs=0.1)  # uniform noise has 1.8
    assert loss.item() == pytest.approx(1.0, abs=0.02)  # E[eps^2] with a zero prediction


def test_timesteps_are_uniform_and_net_time_in_unit_interval() -> None:
    """t covers all of [0, T) uniformly; the network sees (t + 1) / T in (0, 1]."""
    recorder = Recorder()
    model = DiffusionModel(recorder, num_timesteps=10)
    torch.manual_seed(0)
    model(torch.zeros(20_000, 1, 1, 1))
    t_net = recorder.calls[0][1]
    assert t_net.min() > 0 and t_net.max() <= 1
    counts = torch.bincount((t_net * 10).round().long() - 1, minlength=10)
    assert counts.min() > 1800 and counts.max() < 2200


def test_untrained_loss_is_about_one() -> None:
    """The assignment's test: loss on 4 random 3x32x32 inputs (hidden 128, T=20) is a scalar
    whose median over 11 seeds lies in [1.0, 1.2]."""
    losses = []
    for seed in range(11):
        torch.manual_seed(seed)
        model = DiffusionModel(UNet(3, 3, hidden_size=128), num_timesteps=20)
        loss = model(torch.rand(4, 3, 32, 32))
        assert loss.ndim == 0
        losses.append(loss.item())
    assert 1.0 <= statistics.median(losses) <= 1.2, losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda])])
def test_fifty_adam_steps_bring_loss_under_half(device: str) -> None:
    """The assignment's test: 50 Adam steps (lr 5e-4, hidden 32, T=1000) on one batch of 4
    images bring the loss (mean of 16 evaluations) under 0.5."""
    torch.manual_seed(0)
    model = DiffusionModel(UNet(3, 3, hidden_size=32), num_timesteps=1000).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    x = smooth_batch(0).to(device)
    first = model(x).item()
    for _ in range(50):
        train_step(TrainingState(model, optimizer), x)
    with torch.no_grad():
        final = statistics.mean(model(x).item() for _ in range(16))
    assert final < 0.5 < first


# ---- samplers -------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_generator() -> None:
    """Same generator seed -> identical samples (every sampler); another seed -> different."""
    torch.manual_seed(0)
    model = DiffusionModel(UNet(3, 3, hidden_size=8), num_timesteps=10).eval()

    def draw(seed: int, sampler: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return model.sample(2, (3, 32, 32), sampler=sampler, steps=5, eta=1.0, generator=g)

    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        assert torch.equal(draw(1, sampler), draw(1, sampler))
        assert not torch.equal(draw(1, sampler), draw(2, sampler))


def test_samples_are_clamped() -> None:
    """Samples come back in [-1, 1] even from a model whose raw output goes far beyond."""
    model = oracle_model(s=3.0, num_timesteps=50)
    out = model.sample(16, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert out.min() >= -1 and out.max() <= 1 and (out.abs() == 1).any()


def test_sampling_calls_the_network_on_the_models_device_every_step() -> None:
    """Algorithm 2 runs T network calls, all on the model's device, with t from 1 down to 1/T."""
    recorder = Recorder()
    model = DiffusionModel(recorder, num_timesteps=7)
    out = model.sample(3, (1, 32, 32))
    assert out.shape == (3, 1, 32, 32) and out.device == recorder.anchor.device
    times = [t[0].item() for _, t in recorder.calls]
    assert times == pytest.approx([k / 7 for k in range(7, 0, -1)])


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ancestral_sampler_recovers_the_data_distribution(schedule: str, prediction: str) -> None:
    """With the exact prediction for N(0, 0.3^2) data, Algorithm 2's samples have std 0.3 and
    mean 0, for each schedule and prediction target."""
    model = oracle_model(s=0.3, schedule=schedule, prediction=prediction)
    x = model.sample(4096, (1, 1, 1), generator=torch.Generator().manual_seed(0))
    assert x.std().item() == pytest.approx(0.3, rel=0.05)
    assert abs(x.mean().item()) < 0.02


def ode_solution(model: DiffusionModel, x_T: torch.Tensor, s: float) -> torch.Tensor:
    """The probability-flow ODE's exact end for N(0, s^2) data: x0 = s / std_T * x_T."""
    abar_T = model.alphas_cumprod_f64[-1]
    return (s / (abar_T * s**2 + 1 - abar_T).sqrt() * x_T.double()).float().clamp(-1, 1)


def ode_error(model: DiffusionModel, sampler: str, steps: int, s: float = 0.3) -> float:
    x_T = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    out = model.sample(256, (1, 1, 1), sampler=sampler, steps=steps, generator=g)
    return (out - ode_solution(model, x_T, s)).abs().max().item()


def test_ddim_with_all_steps_follows_the_ode() -> None:
    """DDIM (eta=0) is a first-order solver of the probability-flow ODE: with all T steps it
    lands within 0.01 of the exact solution x0 = s / std_T * x_T, and 10x the steps cut the
    error about 10x (0.19, 0.034, 0.0038 measured at 20, 100, 1000 steps)."""
    model = oracle_model(s=0.3)
    errors = {steps: ode_error(model, "ddim", steps) for steps in (20, 100, 1000)}
    assert errors[1000] < 0.01
    assert errors[20] > errors[100] > 5 * errors[1000]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_is_second_order(schedule: str, prediction: str) -> None:
    """DPM-Solver++(2M) solves the probability-flow ODE to second order: at 10 and 20 steps
    it lands far closer to the exact solution than DDIM (first order) at the same steps, and
    2.5x the steps (20 -> 50) cut its error more than 4x (first order: 2.5x; second: 6.25x).
    On the linear schedule with eps: 0.021, 0.011 and 0.0015 at 10, 20 and 50 steps, against
    DDIM's 0.38 and 0.19 at 10 and 20 (measured)."""
    model = oracle_model(s=0.3, schedule=schedule, prediction=prediction)
    dpm = {steps: ode_error(model, "dpmpp_2m", steps) for steps in (10, 20, 50)}
    ddim = {steps: ode_error(model, "ddim", steps) for steps in (10, 20)}
    assert dpm[10] < ddim[10] / 4 and dpm[20] < ddim[20] / 4, (dpm, ddim)
    assert dpm[50] < dpm[20] / 4, dpm


def test_ddim_timesteps() -> None:
    """DDIM's grid runs from T-1 down to 0 with the requested count."""
    grid = ddim_timesteps(1000, 50)
    assert len(grid) == 50 and grid[0] == 999 and grid[-1] == 0 and grid == sorted(grid)[::-1]
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))


def test_same_device_fills_in_the_current_cuda_index() -> None:
    """torch.Generator("cuda") reports `cuda`, a module on the GPU `cuda:0`: one device. Types
    and explicit indices still tell devices apart (on a machine without CUDA too, as long as
    no index has to be filled in)."""
    cpu, gpu1, gpu2 = torch.device("cpu"), torch.device("cuda:1"), torch.device("cuda:2")
    assert _same_device(cpu, torch.device("cpu"))
    assert not _same_device(cpu, gpu1) and not _same_device(gpu1, gpu2)
    assert _same_device(gpu1, torch.device("cuda:1"))
    if torch.cuda.is_available():
        here = torch.device("cuda", torch.cuda.current_device())
        assert _same_device(torch.device("cuda"), here)


@cuda
@pytest.mark.cuda
def test_cuda_loss_and_sampling_stay_on_device() -> None:
    """On CUDA: t, eps and schedules live on the input's device; sampling runs on the model's,
    with every sampler."""
    recorder = Recorder()
    model = DiffusionModel(recorder, num_timesteps=5).to("cuda")
    model(torch.zeros(4, 1, 32, 32, device="cuda"))
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        g = torch.Generator("cuda").manual_seed(0)
        out = model.sample(2, (1, 32, 32), sampler=sampler, steps=3, eta=1.0, generator=g)
        assert out.device.type == "cuda"
    assert all(x.device.type == "cuda" and t.device.type == "cuda" for x, t in recorder.calls)


def test_samplers_take_exactly_the_paper_steps() -> None:
    """Unclipped, the sampler steps are Algorithm 2 and DDIM as printed: mean and sigma of the
    ancestral step at t > 0, no noise at t = 0, and abar_prev = 1 at DDIM's end."""
    torch.manual_seed(0)
    model = DiffusionModel(UNet(3, 3, hidden_size=8), num_timesteps=10).eval()
    ancestral = Ancestral(model.alphas_cumprod_f64, "eps", clip=False)
    x = torch.randn(2, 3, 32, 32)
    z = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for t in (9, 4, 0):
            eps = model.network()(x, torch.full((2,), t))
            b, abar = model.betas[t], model.alphas_cumprod[t]
            mean = (x - b / (1 - abar).sqrt() * eps) / (1 - b).sqrt()
            expected = mean + (b.sqrt() * z if t > 0 else 0.0)
            got = ancestral.step(9 - t, eps, x, z if t > 0 else None)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            x0_hat = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
            ddim = DDIM(model.alphas_cumprod_f64, "eps", clip=False, steps=1)
            ddim.timesteps = [t]  # one step from t to the end
            torch.testing.assert_close(ddim.step(0, eps, x), x0_hat, rtol=1e-5, atol=1e-5)


def test_clipped_steps_use_the_clipped_x0_and_its_consistent_eps() -> None:
    """With clipping (the default) x0_hat is clipped to [-1, 1]; the ancestral mean is the
    posterior mean mu~(x_t, x0_hat) of eq. 7, DDIM continues with the eps that x_t and the
    clipped x0_hat imply, and DDIM's last step returns the clipped x0_hat itself."""
    torch.manual_seed(0)
    model = DiffusionModel(UNet(3, 3, hidden_size=8), num_timesteps=10).eval()
    x = torch.randn(2, 3, 32, 32) * 3  # far outside [-1, 1]: the clip binds
    z = torch.randn(2, 3, 32, 32)
    schedule = linear_beta_schedule(1e-4, 0.02, 10)
    ancestral = Ancestral(model.alphas_cumprod_f64, "eps", clip=True)
    ddim = DDIM(model.alphas_cumprod_f64, "eps", clip=True, steps=3)
    ddim.timesteps = [9, 4, 0]
    with torch.no_grad():
        for i, (t, t_prev) in enumerate(((9, 4), (4, 0), (0, -1))):
            eps = model.network()(x, torch.full((2,), t))
            abar = schedule["alphas_cumprod"][t].float()
            abar_prev = schedule["alphas_cumprod"][t_prev].float() if t_prev >= 0 else 1.0
            x0_hat = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
            assert (x0_hat.abs() == 1).any()
            eps_clip = (x - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
            want = abar_prev**0.5 * x0_hat + (1 - abar_prev) ** 0.5 * eps_clip
            torch.testing.assert_close(ddim.step(i, eps, x), want, rtol=1e-4, atol=1e-4)
            # eq. 7 written out from the schedule's betas, not the stored coefficients
            b = schedule["betas"][t].float()
            abar_before = schedule["alphas_cumprod_prev"][t].float()  # abar_{t-1}
            mean = (
                abar_before.sqrt() * b / (1 - abar) * x0_hat
                + (1 - b).sqrt() * (1 - abar_before) / (1 - abar) * x
            )
            got = ancestral.step(9 - t, eps, x, z if t > 0 else None)
            want = mean + (b.sqrt() * z if t > 0 else 0.0)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ddim_with_eta_one_is_the_ancestral_step_with_posterior_variance() -> None:
    """DDIM's eta = 1 step from t to t - 1 is the posterior step of eq. 7: mean mu~(x_t, x0_hat)
    and variance beta~_t (Song et al. 2021, eq. 16)."""
    torch.manual_seed(0)
    model = DiffusionModel(UNet(3, 3, hidden_size=8), num_timesteps=10).eval()
    x, z = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    ddim = DDIM(model.alphas_cumprod_f64, "eps", clip=True, steps=10, eta=1.0)
    with torch.no_grad():
        for t in (9, 5, 1):
            eps = model.network()(x, torch.full((2,), t))
            abar = model.alphas_cumprod_f64[t].item()
            x0_hat, _ = split_prediction("eps", eps, x, abar**0.5, (1 - abar) ** 0.5, clip=True)
            mean = model.posterior_mean_coef1[t] * x0_hat + model.posterior_mean_coef2[t] * x
            want = mean + model.posterior_variance[t].sqrt() * z
            got = ddim.step(9 - t, eps, x, z)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_stochastic_ddim_recovers_the_data_distribution() -> None:
    """With the exact eps for N(0, 0.3^2) data, DDIM with eta = 1 on all 1000 steps (DDPM with
    the posterior variance) draws samples with std 0.3 and mean 0, reproducibly from a
    generator. (On fewer steps both DDIMs shrink the spread: std 0.274 with eta = 1 and 0.285
    with eta = 0 at 100 steps, measured.)"""
    model = oracle_model(s=0.3)

    def draw() -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return model.sample(4096, (1, 1, 1), sampler="ddim", steps=1000, eta=1.0, generator=g)

    x = draw()
    assert x.std().item() == pytest.approx(0.3, rel=0.05)
    assert abs(x.mean().item()) < 0.02
    assert torch.equal(x, draw())


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_clipping_is_a_sampler_option(sampler: str) -> None:
    """Every sampler clips by default and takes clip_denoised=False; with the exact eps of
    in-range data the clip never binds and both give the same samples."""
    model = oracle_model(s=0.3, num_timesteps=100)

    def draw(clip: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return model.sample(64, (1, 1, 1), sampler=sampler, steps=20, generator=g,
                            clip_denoised=clip)  # fmt: skip

    torch.testing.assert_close(draw(True), draw(False), rtol=1e-5, atol=1e-5)


# ---- prediction targets and loss weighting ---------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_each_prediction_target_gives_back_x0_and_eps(prediction: str) -> None:
    """The network's target for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, turned back into
    estimates, is exactly (x0, eps) again, at low, middle and high noise."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1, torch.randn(3, 2, 4, 4, generator=g)
    for abar in (0.9999, 0.5, 4e-5):
        a, s = abar**0.5, (1 - abar) ** 0.5
        x_t = a * x0.double() + s * eps.double()
        target = prediction_target(prediction, x0.double(), eps.double(), a, s)
        x0_hat, eps_hat = split_prediction(prediction, target, x_t, a, s)
        torch.testing.assert_close(x0_hat, x0.double(), rtol=0, atol=1e-9)
        torch.testing.assert_close(eps_hat, eps.double(), rtol=0, atol=1e-9)


def test_v_is_the_velocity_of_salimans_and_ho() -> None:
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, sec. 4): eps at pure noise,
    -x0 at the clean image."""
    x0, eps = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 2.0)
    assert prediction_target("v", x0, eps, 0.0, 1.0).item() == -0.5
    assert prediction_target("v", x0, eps, 1.0, 0.0).item() == 2.0
    assert prediction_target("v", x0, eps, 0.6, 0.8).item() == pytest.approx(0.6 * 2 - 0.8 * 0.5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_min_snr_makes_every_target_weigh_the_same_x0_error(schedule: str) -> None:
    """With min_snr (Hang et al. 2023) the loss of an estimate is min(SNR_t, gamma) times its
    squared error in x0, whatever the network predicts: the three targets' losses of one
    estimate agree, and uniform weighting differs between them by SNR factors."""
    gamma = 5.0
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    error = 0.1 * torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    x0_guess = x0 + error  # an estimate with an error
    t = torch.tensor([0, 10, 100, 300, 500, 700, 900, 999])
    abar = schedule_constants(named_betas(schedule, 1000))["alphas_cumprod"][t]
    a, s = abar.sqrt().reshape(-1, 1, 1, 1), (1 - abar).sqrt().reshape(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    eps_guess = (x_t - a * x0_guess) / s  # the same estimate, as each target
    snr = abar / (1 - abar)
    want = snr.clamp(max=gamma) * error.square().flatten(1).mean(1)
    for prediction in ("eps", "v", "x0"):
        output = prediction_target(prediction, x0_guess, eps_guess, a, s)
        target = prediction_target(prediction, x0, eps, a, s)
        per_example = (output - target).square().flatten(1).mean(1)
        loss = loss_weight("min_snr", prediction, snr, gamma) * per_example
        torch.testing.assert_close(loss, want, rtol=1e-9, atol=0)


def test_min_snr_loss_is_the_weighted_mean_and_uniform_is_l_simple() -> None:
    """DiffusionModel's loss with min_snr is the batch mean of each example's weighted squared
    error; with uniform weighting it is F.mse_loss of the output and target (L_simple)."""
    torch.manual_seed(0)
    x0 = torch.rand(6, 3, 32, 32) * 2 - 1
    t, eps = torch.tensor([0, 1, 50, 400, 900, 999]), torch.randn(6, 3, 32, 32)
    net = UNet(3, 3, hidden_size=8)
    for prediction in ("eps", "v", "x0"):
        plain = DiffusionModel(net, prediction=prediction)
        weighted = DiffusionModel(net, prediction=prediction, loss_weighting="min_snr")
        a = plain.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
        s = plain.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
        output = net(a * x0 + s * eps, (t + 1).float() / 1000)
        target = prediction_target(prediction, x0, eps, a, s)
        per_example = (output - target).square().flatten(1).mean(1)
        abar = plain.alphas_cumprod[t]
        w = loss_weight("min_snr", prediction, abar / (1 - abar))
        torch.testing.assert_close(weighted(x0, t, eps), (w * per_example).mean())
        torch.testing.assert_close(plain(x0, t, eps), per_example.mean())


def test_unknown_options_fail_clearly() -> None:
    """An unknown schedule, prediction or loss weighting is refused, naming the known ones."""
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        DiffusionModel(Recorder(), schedule="quadratic")
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        DiffusionModel(Recorder(), prediction="noise")
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        DiffusionModel(Recorder(), loss_weighting="snr")


def test_cosine_schedule_pins() -> None:
    """The cosine schedule (Nichol & Dhariwal 2021, eq. 17): abar_t = f((t + 1) / T) / f(0)
    with f(u) = cos^2((u + 0.008) / 1.008 pi / 2): 1 - 4.128e-5 at t = 0 and 0.493844 at
    t = 499 (u = 1/2), the last beta capped at 0.999 and abar strictly decreasing to under
    1e-8."""
    abar = schedule_constants(named_betas("cosine", 1000))["alphas_cumprod"]
    assert abar[0].item() == pytest.approx(1 - 4.128e-5, abs=1e-8)
    assert abar[499].item() == pytest.approx(0.493844, abs=1e-6)
    assert torch.all(abar[1:] < abar[:-1]) and abar[-1].item() < 1e-8
    assert named_betas("cosine", 1000).max().item() == pytest.approx(0.999)


# ---- compiling ------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_network_matches_eager() -> None:
    """With compile=True every sampler calls the network through torch.compile and gives the
    eager samples for the same generator (within 1e-4; measured 7e-6), compiling once per
    model: the compiled network lives on the model, and a deep copy (the EMA) compiles its
    own. ~30-60 s on 2 CPUs, mostly compiling."""
    torch.manual_seed(0)
    model = DiffusionModel(UNet(3, 3, hidden_size=8), num_timesteps=12).eval()

    def both(sampler: str) -> tuple[torch.Tensor, torch.Tensor]:
        draws = []
        for compile in (False, True):
            g = torch.Generator().manual_seed(1)
            draws.append(model.sample(2, (3, 32, 32), sampler=sampler, steps=4, eta=1.0,
                                      generator=g, compile=compile))  # fmt: skip
        return draws[0], draws[1]

    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        eager, compiled = both(sampler)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    first = model._compiled["network"]
    both("ddim")
    assert model._compiled["network"] is first
    assert "network" not in copy.deepcopy(model)._compiled  # an EMA copy compiles its own


@cuda
@pytest.mark.cuda
def test_cuda_graph_sampler_is_reproducible_and_matches_eager() -> None:
    """On CUDA the compiled network (a CUDA graph per call) gives the same samples twice from
    one seed, and the eager sampler's (fp32; per-step noise from a CUDA generator seeded from
    the CPU one in both), with every sampler. TF32 is off for both: cuDNN's default TF32
    convolutions round to 10 mantissa bits; with them, eager and graphed samples differed by up
    to 3.2e-3 on an H100."""
    torch.manual_seed(0)
    model = DiffusionModel(UNet(3, 3, hidden_size=16), num_timesteps=50).to("cuda").eval()

    def draw(sampler: str, compile: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return model.sample(4, (3, 32, 32), sampler=sampler, steps=10, eta=1.0, generator=g,
                            compile=compile)  # fmt: skip

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for sampler in ("ddpm", "ddim", "dpmpp_2m"):
            eager, graphed = draw(sampler, False), draw(sampler, True)
            again = draw(sampler, True)
            assert torch.equal(graphed, again)
            torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-3)
