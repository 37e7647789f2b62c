"""Each sampler step against diffusers' scheduler of the same name: the same x_t, t, network
output and noise give the same next x within 1e-5 in fp32, for both schedules, all three
prediction targets, clipped and unclipped; and the schedules themselves against diffusers'.

The schedules are compared first (diffusers keeps them in float32). The steps are then compared
with diffusers' scheduler given the same float64 schedule and run in float64, so the comparison
is of the step's math: diffusers' own float32 arithmetic moves its result further than that
(up to 9.4e-5 for DDPMScheduler at t = 2, where 1 - abar_t / abar_prev loses digits in float32,
and 2.9e-3 for DPMSolverMultistepScheduler with the cosine schedule at t = 999; measured
against the same scheduler in float64).
"""

import math

import diffusers.schedulers.scheduling_ddpm
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ddpm.samplers import DDIM, Ancestral, DPMSolverPP2M, dpm_solver_timesteps, make_sampler
from ddpm.schedules import named_betas, schedule_constants

TOLERANCE = 1e-5  # issue 25: the same next x within 1e-5 in fp32
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULES = ["linear", "cosine"]
PREDICTIONS = ["eps", "v", "x0"]


def abar(schedule: str, T: int = 1000) -> torch.Tensor:
    return schedule_constants(named_betas(schedule, T))["alphas_cumprod"]


def config(schedule: str, prediction: str, **extra) -> dict:
    return {
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": DIFFUSERS_SCHEDULE[schedule],
        "prediction_type": DIFFUSERS_PREDICTION[prediction],
        **extra,
    }


def fake_output(x: torch.Tensor, t: int, schedule: str, prediction: str) -> torch.Tensor:
    """A deterministic stand-in for a network's output at (x, t): the output of `prediction`
    that implies the clean image 1.3 tanh(x + 0.3 sin(t / 97)), so x0 estimates stay within
    [-1.3, 1.3] (clipping binds for some pixels) and trajectories stay bounded."""
    a = abar(schedule)[t].item()
    x0 = 1.3 * torch.tanh(x.double() + 0.3 * math.sin(t / 97.0))
    eps = (x.double() - a**0.5 * x0) / (1 - a) ** 0.5
    out = {"eps": eps, "x0": x0, "v": a**0.5 * eps - (1 - a) ** 0.5 * x0}[prediction]
    return out.float()


def start(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def in_float64(scheduler, schedule: str):
    """diffusers' scheduler on our float64 abar_t (its arithmetic then runs in float64)."""
    scheduler.alphas_cumprod = abar(schedule)
    scheduler.one = scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def gap(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.double() - expected.double()).abs().max().item()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_match_diffusers(schedule: str) -> None:
    """Our float64 abar_t, stored as float32, is diffusers' (float32) to 1e-6 for linear and
    cosine (squaredcos_cap_v2)."""
    theirs = DDPMScheduler(**config(schedule, "eps")).alphas_cumprod
    torch.testing.assert_close(abar(schedule).float(), theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ancestral_steps_match_ddpm_scheduler(
    schedule: str, prediction: str, clip: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Algorithm 2 (sigma^2 = beta) is DDPMScheduler(variance_type='fixed_large') at every
    step of a whole 1000-step trajectory."""
    theirs = in_float64(
        DDPMScheduler(**config(schedule, prediction), variance_type="fixed_large",
                      clip_sample=clip), schedule
    )  # fmt: skip
    ours = Ancestral(abar(schedule), prediction, clip)
    assert ours.timesteps == theirs.timesteps.tolist()
    x, worst = start(), 0.0
    for i, t in enumerate(ours.timesteps):
        output = fake_output(x, t, schedule, prediction)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        # DDPMScheduler draws its noise itself: hand it the same numbers.
        monkeypatch.setattr(
            diffusers.schedulers.scheduling_ddpm,
            "randn_tensor",
            lambda *a, noise=noise, **k: noise.double(),
        )
        expected = theirs.step(output.double(), t, x.double()).prev_sample
        got = ours.step(i, output, x, noise if i < len(ours.timesteps) - 1 else None)
        worst = max(worst, gap(got, expected))
        x = expected.float()
    assert worst < TOLERANCE, worst


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_steps_match_ddim_scheduler(
    schedule: str, prediction: str, clip: bool, eta: float
) -> None:
    """DDIM is DDIMScheduler (use_clipped_model_output, as the eps consistent with a clipped
    x0 is used) at every step of a 50-step trajectory, on diffusers' own timesteps."""
    theirs = in_float64(DDIMScheduler(**config(schedule, prediction), clip_sample=clip), schedule)
    theirs.set_timesteps(50)
    ours = DDIM(abar(schedule), prediction, clip, steps=50, eta=eta)
    ours.timesteps = theirs.timesteps.tolist()  # diffusers' "leading" grid: 980, 960, ..., 0
    x, worst = start(), 0.0
    for i, t in enumerate(ours.timesteps):
        output = fake_output(x, t, schedule, prediction)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        expected = theirs.step(
            output.double(), t, x.double(), eta=eta, use_clipped_model_output=True,
            variance_noise=noise.double(),
        ).prev_sample  # fmt: skip
        got = ours.step(i, output, x, noise)
        worst = max(worst, gap(got, expected))
        x = expected.float()
    assert worst < TOLERANCE, worst


@pytest.mark.parametrize("grid", ["ours", "diffusers"])
@pytest.mark.parametrize("steps", [5, 20, 25])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dpm_solver_steps_match_dpm_solver_multistep_scheduler(
    schedule: str, prediction: str, clip: bool, steps: int, grid: str
) -> None:
    """DPM-Solver++(2M) is DPMSolverMultistepScheduler(algorithm_type='dpmsolver++',
    solver_order=2) on the same timesteps (ours, given to it, or its default "linspace"), its
    clipping being thresholding at sample_max_value=1, at every step of whole trajectories of
    5, 20 and 25 steps."""
    theirs = DPMSolverMultistepScheduler(
        **config(schedule, prediction), algorithm_type="dpmsolver++", solver_order=2,
        thresholding=clip, sample_max_value=1.0,
    )  # fmt: skip
    ours = DPMSolverPP2M(abar(schedule), prediction, clip, steps)
    if grid == "ours":
        theirs.set_timesteps(timesteps=ours.timesteps)
    else:
        theirs.set_timesteps(steps)
        ours.timesteps = theirs.timesteps.tolist()
    # Its sigmas (sqrt((1 - abar) / abar) at the timesteps, then 0) from the float64 schedule.
    a = abar(schedule)[theirs.timesteps]
    theirs.sigmas = torch.cat([((1 - a) / a).sqrt(), a.new_zeros(1)])
    x, worst = start(), 0.0
    for i, t in enumerate(ours.timesteps):
        output = fake_output(x, t, schedule, prediction)
        expected = theirs.step(output.double(), t, x.double()).prev_sample
        got = ours.step(i, output, x)
        worst = max(worst, gap(got, expected))
        x = expected.float()
    assert worst < TOLERANCE, worst


def test_dpm_solver_timesteps_are_uniform_in_log_snr() -> None:
    """The grid starts at T-1, ends at 0, and its half-log-SNRs are evenly spaced (within the
    rounding to whole timesteps) from max(lambda_{T-1}, -5.1) to lambda_0."""
    for schedule in SCHEDULES:
        a = abar(schedule)
        grid = dpm_solver_timesteps(a, 20)
        assert grid[0] == 999 and grid[-1] == 0 and len(grid) == 20
        lambdas = 0.5 * (a / (1 - a)).log()[grid[1:]]
        gaps = lambdas[1:] - lambdas[:-1]
        assert gaps.min() > 0.5 * gaps.mean() and gaps.max() < 1.5 * gaps.mean(), gaps


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_bad_steps_and_names_fail_clearly(name: str) -> None:
    """Steps outside [1, T], an unknown sampler or prediction and eta outside [0, 1] are
    refused with messages naming what is accepted."""
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
        make_sampler(name, abar("linear"), "eps", steps=1001)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_sampler("euler", abar("linear"), "eps")
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        make_sampler(name, abar("linear"), "noise")
    with pytest.raises(ValueError, match="eta must be in"):
        make_sampler("ddim", abar("linear"), "eps", steps=10, eta=1.5)
