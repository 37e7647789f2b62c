"""The EDM formulation (ddpm.edm, DiffusionModel(edm=EDMParams(...))): its loss is EDM's
weighted denoising loss, its training sigma is log-normal, sigma_data is measured on the data
and kept in checkpoints, and a checkpoint refuses to resume into the other formulation or
another sigma_data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ddpm.build import build_training, with_sigma_data
from ddpm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ddpm.datasets import TensorImageDataset, sigma_data_of
from ddpm.diffusion import DiffusionModel
from ddpm.edm import EDMParams, edm_training_target, precondition
from ddpm.generate import load_trained_model


class Mixer(torch.nn.Module):
    """A tiny float64 network F(x_in, c_noise) with weights: enough to carry a loss."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, dtype=torch.float64)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x.double()) + time.double()[:, None, None, None])


def test_the_edm_loss_is_lambda_weighted_denoising_error() -> None:
    """DiffusionModel's edm loss equals EDM's loss as NVlabs/edm writes it, the mean of
    lambda(sigma) (D(y + sigma n; sigma) - y)^2 with lambda = (sigma^2 + sigma_data^2) /
    (sigma sigma_data)^2, for sigmas from 0.002 to 80 (to float64 rounding)."""
    torch.manual_seed(0)
    sigma_data = 0.37
    model = DiffusionModel(Mixer(), num_timesteps=10, edm=EDMParams(sigma_data=sigma_data))
    y = torch.rand(5, 3, 8, 8, dtype=torch.float64) * 2 - 1
    n = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.05, 0.5, 3.0, 80.0], dtype=torch.float64)
    ours = model(y, sigma, n)
    s = sigma[:, None, None, None]
    c_skip, c_out, c_in, c_noise = precondition(s, sigma_data)
    x = y + s * n
    denoised = c_skip * x + c_out * model.eps_model(c_in * x, c_noise.flatten())
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    theirs = (weight * (denoised - y) ** 2).mean()
    assert float(ours) == pytest.approx(float(theirs), rel=1e-9)


def test_with_sigma_data_one_the_edm_target_is_minus_v() -> None:
    """The issue's "v with cosine is EDM's preconditioning with sigma_data = 1 in disguise":
    F's target at sigma_data = 1 is -v (Salimans & Ho) of the VP point of the same sigma."""
    y, n = (
        torch.randn(4, 3, 2, 2, dtype=torch.float64),
        torch.randn(4, 3, 2, 2, dtype=torch.float64),
    )
    sigma = torch.tensor([0.01, 0.3, 1.0, 40.0], dtype=torch.float64)[:, None, None, None]
    alpha, sigma_vp = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
    v = alpha * n - sigma_vp * y
    assert torch.allclose(edm_training_target(y, n, sigma, 1.0), -v, rtol=0, atol=1e-14)


def test_a_loaded_state_brings_its_sigma_data_into_the_loss() -> None:
    """An edm model built with one sigma_data and loaded with another's state (a checkpoint,
    an EMA's) computes its loss with the loaded value, as a model built with it does."""
    torch.manual_seed(0)
    source = DiffusionModel(Mixer(), num_timesteps=10, edm=EDMParams(sigma_data=0.3))
    loaded = DiffusionModel(Mixer(), num_timesteps=10, edm=EDMParams(sigma_data=0.5))
    loaded.load_state_dict(source.state_dict())
    y, n = torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.1, 2.0], dtype=torch.float64)
    assert float(loaded(y, sigma, n)) == float(source(y, sigma, n))


def test_training_sigmas_are_log_normal() -> None:
    """The edm training draws ln sigma ~ N(p_mean, p_std^2): over 200,000 draws the sample
    mean and std lie within 5 standard errors of p_mean and p_std."""
    torch.manual_seed(0)
    model = DiffusionModel(Mixer(), num_timesteps=10, edm=EDMParams(p_mean=-0.7, p_std=1.6))
    draws = 200_000
    sigma, eps = model.draw_training_noise(torch.zeros(draws, 1, 1, 1))
    ln = sigma.double().log()
    assert abs(float(ln.mean()) + 0.7) <= 5 * 1.6 / math.sqrt(draws)
    assert abs(float(ln.std()) - 1.6) <= 5 * 1.6 / math.sqrt(2 * draws)
    assert eps.shape == (draws, 1, 1, 1)


def test_sigma_data_is_the_images_std_and_the_same_each_time() -> None:
    """sigma_data_of is the std of the images in [-1, 1] (all of them when few), to 4 digits,
    and the same on every call; with more images than it reads, it reads evenly spread ones."""
    images = torch.randint(
        0, 256, (50, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    dataset = TensorImageDataset(images)
    expected = round(float((images.double() / 127.5 - 1).std()), 4)
    assert sigma_data_of(dataset) == expected == sigma_data_of(dataset)
    dark = TensorImageDataset(torch.full((5000, 1, 2, 2), 100, dtype=torch.uint8))
    dark.images[::2] = 200  # every other image bright: an even spread sees both
    assert 0.35 < sigma_data_of(dark) < 0.45


def test_sigma_data_is_measured_kept_and_checked(tiny_config, tmp_path: Path) -> None:
    """An edm run measures sigma_data on its images (with_sigma_data), its model and
    checkpoint keep it, sampling rebuilds the model with it, and resuming with another value,
    or into the discrete formulation, is refused naming the setting and the checkpoint's value;
    a set sigma_data is kept as set."""
    images = torch.randint(
        0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    dataset = TensorImageDataset(images)
    config = with_sigma_data(tiny_config({"diffusion.formulation": "edm"}), dataset)
    assert config.diffusion.sigma_data == sigma_data_of(dataset)
    state = build_training(config, 10)
    assert float(state.diffusion.sigma_data) == config.diffusion.sigma_data
    path = save_checkpoint(tmp_path / "edm.pt", state.snapshot())
    trained = load_trained_model(path)
    assert float(trained.diffusion.sigma_data) == config.diffusion.sigma_data
    assert trained.diffusion.formulation == "edm"
    other = tiny_config({"diffusion.formulation": "edm", "diffusion.sigma_data": 0.25})
    assert with_sigma_data(other, dataset).diffusion.sigma_data == 0.25
    with pytest.raises(
        CheckpointError, match=r"diffusion\.sigma_data=.*0\.25.*set diffusion\.sigma_data"
    ):
        build_training(other, 10).restore(load_checkpoint(path), str(path))
    discrete = tiny_config({"diffusion.formulation": "discrete"})
    with pytest.raises(
        CheckpointError, match=r"diffusion\.formulation='edm'; the current settings have 'discrete'"
    ):
        build_training(discrete, 10).restore(load_checkpoint(path), str(path))
