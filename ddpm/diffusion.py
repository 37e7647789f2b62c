"""Gaussian diffusion around any network: the forward process, the training loss, and
sampling with any of the samplers of ddpm.samplers and ddpm.sigma_samplers.

Two formulations (`formulation`):
- discrete (Ho et al. 2020): timesteps 0-indexed, t in {0, ..., T-1}; the network is given
  (t + 1) / T, a float in (0, 1], and predicts `prediction` (eps, v or x0; ddpm.schedules).
- edm (Karras et al. 2022): a continuous noise level sigma; the network F is given c_in x and
  c_noise = ln(sigma) / 4 and wrapped by EDM's preconditioning (ddpm.edm).
Either is a denoiser D(x; sigma) (`denoise`), which the samplers on sigma integrate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.compiled_network import CompiledFunctions, compiled_network, network_output
from ddpm.edm import (
    P_MEAN,
    P_STD,
    SIGMA_MAX,
    SIGMA_MIN,
    EDMParams,
    edm_training_target,
    precondition,
    sigma_to_t,
    vp_sigmas,
)
from ddpm.noise import Generators, draw_noise, step_generator
from ddpm.samplers import make_sampler
from ddpm.schedules import (
    check_prediction,
    linear_beta_schedule,
    loss_weight,
    named_betas,
    prediction_target,
    schedule_constants,
    split_prediction,
)
from ddpm.sigma_samplers import SIGMA_SAMPLERS, make_sigma_sampler

__all__ = ["DiffusionModel", "extract", "linear_beta_schedule"]

# The network as a sampler calls it: (x_t (B, C, H, W), t (B,) long) -> its output.
Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather values[t] and shape it to broadcast against a (B, ...) tensor of `ndim` dims.

    Args:
        values: (T,) per-timestep constants.
        t: (B,) long timesteps on values' device.
        ndim: number of dims of the tensor the result multiplies.

    Returns:
        (B, 1, ..., 1) tensor with ndim dims.
    """
    return values.gather(0, t).reshape(t.shape[0], *([1] * (ndim - 1)))


def _read_sigma_data(model: DiffusionModel, _: Any) -> None:
    """After a state dict is loaded into an edm model: its host copy of sigma_data."""
    model.sigma_data_value = float(model.sigma_data)


class DiffusionModel(nn.Module):
    """A DDPM: the forward (noising) process, the training loss, and sampling.

    Args:
        eps_model: the network (x_t: (B, C, H, W), t: (B,) float in (0, 1]) -> its prediction
            (B, C, H, W) of `prediction` (the attribute keeps the DDPM paper's name, and
            checkpoints their `eps_model.*` keys, whatever it predicts).
        betas: (beta_start, beta_end) of the linear schedule.
        num_timesteps: T.
        schedule: linear or cosine (see ddpm.schedules).
        prediction: what the network predicts: eps, v or x0.
        loss_weighting: uniform (L_simple) or min_snr.
        min_snr_gamma: min_snr's cap on the SNR.
        edm: the EDM formulation with these parameters (ddpm.edm; betas, schedule,
            prediction and the loss weighting are then unused, the schedule's buffers kept as
            they are; sigma_data becomes a buffer, so a checkpoint keeps it); None: the
            discrete formulation (`formulation` says which).
    """

    def __init__(
        self,
        eps_model: nn.Module,
        betas: tuple[float, float] = (1e-4, 0.02),
        num_timesteps: int = 1000,
        *,
        schedule: str = "linear",
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        edm: EDMParams | None = None,
    ) -> None:
        super().__init__()
        if edm is not None and (edm.sigma_data <= 0 or edm.p_std <= 0):
            raise ValueError(f"sigma_data and p_std must be positive, got {edm}")
        check_prediction(prediction)
        loss_weight(loss_weighting, prediction, torch.ones(1), min_snr_gamma)  # fail now
        self.eps_model = eps_model
        self.num_timesteps = num_timesteps
        self.betas_range = (float(betas[0]), float(betas[1]))
        self.schedule, self.prediction = schedule, prediction
        self.loss_weighting, self.min_snr_gamma = loss_weighting, min_snr_gamma
        constants = schedule_constants(named_betas(schedule, num_timesteps, *self.betas_range))
        # The samplers' coefficients come from float64 abar_t, on the host.
        self.alphas_cumprod_f64 = constants["alphas_cumprod"]
        for name, values in constants.items():
            self.register_buffer(name, values.to(torch.float32))
        self.formulation = "discrete" if edm is None else "edm"
        self.p_mean, self.p_std = (P_MEAN, P_STD) if edm is None else (edm.p_mean, edm.p_std)
        if edm is not None:  # measured on the data when a run starts: kept with the weights
            self.register_buffer("sigma_data", torch.tensor(edm.sigma_data, dtype=torch.float64))
            # Its value on the host, which every step reads: reading the buffer on a GPU would
            # wait for the device. Loading a state dict (a checkpoint) is what changes it.
            self.sigma_data_value = edm.sigma_data
            self.register_load_state_dict_post_hook(_read_sigma_data)
        # The discrete schedule on sigma (EDM Table 1, VP): ln sigma_t, increasing in t.
        self.log_sigmas = vp_sigmas(self.alphas_cumprod_f64).log().tolist()
        self._compiled = CompiledFunctions()

    def _net_time(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) long timesteps in [0, T) -> (B,) float in (0, 1], the network's time input."""
        return (t + 1).float() / self.num_timesteps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)   (DDPM eq. 4).

        Args:
            x0: (B, C, H, W) clean images in [-1, 1].
            t: (B,) long timesteps in [0, T).
            eps: (B, C, H, W) standard Gaussian noise.

        Returns:
            (B, C, H, W) x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
        """
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * eps
        )

    @property
    def labels_flips(self) -> bool:
        """Whether training flips the images itself and tells the network (non-leaky
        augmentation, EDM Appendix F): the network takes augmentation labels."""
        return getattr(self.eps_model, "augment", None) is not None

    def draw_training_noise(self, x0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """t ~ U{0..T-1} (B,) (edm: the noise levels sigma, ln sigma ~ N(p_mean, p_std^2))
        and eps ~ N(0, I) like x0, and where the network takes augmentation labels
        (labels_flips) the flips (B,) bool, each with probability 1/2; from the global
        generator of x0's device, in that order (a data-parallel run draws them for the global
        batch). The forward takes them as they come: model(x0, *noise)."""
        if self.formulation == "edm":  # EDM Table 1, "Ours": the training noise distribution
            ln_sigma = torch.randn(x0.shape[0], device=x0.device) * self.p_std + self.p_mean
            t = ln_sigma.exp()
        else:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        if not self.labels_flips:
            return t, eps
        return t, eps, torch.rand(x0.shape[0], device=x0.device) < 0.5

    def forward(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        flips: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training loss: the squared error of the network's prediction (DDPM eq. 14's
        L_simple for eps with uniform weighting), weighted per timestep by loss_weighting.

        For edm, EDM's loss (sec. 5, eq. 8): lambda(sigma) ||D(y + sigma n; sigma) - y||^2,
        as the equal unweighted error of F (ddpm.edm.edm_training_target).

        Args:
            x0: (B, C, H, W) clean images in [-1, 1].
            t, eps: (B,) timesteps (edm: noise levels sigma) and (B, C, H, W) noise; drawn
                here when not given.
            flips: (B,) bool: mirror these images left-right and tell the network (its
                augmentation label 1; 0 for the others and at sampling); drawn here with t
                and eps where the network takes labels (labels_flips).

        Returns:
            scalar: the mean over the batch of each example's weighted mean squared error
            between the network's output at x_t and its target (eps, v or x0; edm: F's).
        """
        if t is None or eps is None:
            t, eps, *drawn = self.draw_training_noise(x0)
            flips = drawn[0] if drawn else flips
        labels = None
        if flips is not None and self.labels_flips:
            x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
            labels = flips.to(x0.dtype)[:, None]  # (B, 1): [flipped]
        if self.formulation == "edm":
            sigma = t.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
            sigma_data = self.sigma_data_value
            _, _, c_in, c_noise = precondition(sigma, sigma_data)
            output = self._train_network(c_in * (x0 + sigma * eps), c_noise.flatten(), labels)
            return F.mse_loss(output, edm_training_target(x0, eps, sigma, sigma_data))
        sqrt_abar = extract(self.sqrt_alphas_cumprod, t, x0.ndim)
        sqrt_one_minus_abar = extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
        x_t = sqrt_abar * x0 + sqrt_one_minus_abar * eps  # q_sample
        output = self._train_network(x_t, self._net_time(t), labels)
        target = prediction_target(self.prediction, x0, eps, sqrt_abar, sqrt_one_minus_abar)
        if self.loss_weighting == "uniform":
            return F.mse_loss(output, target)
        per_example = (output.float() - target).square().flatten(1).mean(1)  # (B,)
        abar = self.alphas_cumprod.gather(0, t)
        weights = loss_weight(
            self.loss_weighting, self.prediction, abar / (1.0 - abar), self.min_snr_gamma
        )
        return (weights * per_example).mean()

    def _train_network(
        self, x_in: torch.Tensor, time: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The network in training: with the augmentation labels where it takes them."""
        if labels is None:
            return self.eps_model(x_in, time)
        return self.eps_model(x_in, time, labels)

    def network(self, compile: bool = False) -> Network:
        """The network as sampling calls it: (x_t (B, C, H, W), t (B,) long) -> its output.

        With `compile`, through torch.compile (compiled once per model; an EMA copy compiles
        its own); on CUDA as a CUDA graph (mode "reduce-overhead"): one replay per step instead
        of a launch per kernel, which is what bounds a small network's sampling speed.
        """
        run = self._network_at(compile)
        return lambda x_t, t: run(x_t, self._net_time(t))

    def _network_at(self, compile: bool = False) -> Network:
        """The network as (x_in (B, C, H, W), its time input (B,) float) -> its output, through
        torch.compile if asked (see network)."""
        if not compile:
            return lambda x_in, time: network_output(self, x_in, time)
        return compiled_network(self, self._compiled, cuda=self.betas.device.type == "cuda")

    def sigma_range(self) -> tuple[float, float]:
        """The default (sigma_min, sigma_max) of the Karras steps: EDM's (0.002, 80), or the
        discrete schedule's own ends, sigma_0 and sigma_{T-1} (as k-diffusion and diffusers'
        use_karras_sigmas)."""
        if self.formulation == "edm":
            return SIGMA_MIN, SIGMA_MAX
        return math.exp(self.log_sigmas[0]), math.exp(self.log_sigmas[-1])

    def denoise(
        self, x: torch.Tensor, sigma: float, network: Network | None = None, clip: bool = False
    ) -> torch.Tensor:
        """D(x; sigma): the model's estimate of the clean image under noise of level sigma.

        edm: c_skip x + c_out F(c_in x; c_noise) (ddpm.edm.precondition). discrete: the
        network at x_t = x / sqrt(1 + sigma^2) and the fractional timestep of sigma (ddpm.edm.
        sigma_to_t; its time input (t + 1) / T), its output turned into x0 (split_prediction).

        Args:
            x: (B, C, H, W), any float dtype (the network is given float32; D is computed in
                x's dtype).
            sigma: the noise level, > 0.
            network: the network as _network_at returns it (default: uncompiled).
            clip: clip D to [-1, 1] (sample.clip_denoised).

        Returns:
            (B, C, H, W) D(x; sigma) in x's dtype.
        """
        network = network or self._network_at()
        batch = torch.full((x.shape[0],), 1.0, device=x.device)
        if self.formulation == "edm":
            c_skip, c_out, c_in, c_noise = precondition(sigma, self.sigma_data_value)
            output = network((c_in * x).float(), batch * c_noise)
            d = c_skip * x + c_out * output.to(x.dtype)
            return d.clamp(-1.0, 1.0) if clip else d
        scale = 1.0 / math.sqrt(1.0 + sigma**2)  # sqrt(abar) of this sigma
        x_t = x * scale
        time = (sigma_to_t(sigma, self.log_sigmas) + 1) / self.num_timesteps
        output = network(x_t.float(), batch * time).to(x.dtype)
        x0_hat, _ = split_prediction(self.prediction, output, x_t, scale, sigma * scale, clip)
        return x0_hat

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        size: Sequence[int],
        sampler: str = "ddpm",
        *,
        generator: Generators = None,
        compile: bool = False,
        progress: Callable[[], None] | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Draw samples on the module's device with a sampler of ddpm.samplers.

        Args:
            num_samples: B.
            size: (C, H, W) of one image.
            sampler: ddpm (Algorithm 2, all T steps), ddim or dpmpp_2m on the discrete
                formulation's timesteps; euler, heun, dpmpp_2m_karras or dpmpp_3m_karras on
                Karras steps of sigma (either formulation; ddpm.sigma_samplers).
            generator: source of all noise; the same seed gives the same samples on one kind
                of device. x_T is drawn from it wherever it is; the per-step noise on the
                module's device (ddpm.noise.step_generator). A sequence of B generators gives
                each image noise of its own (ddpm.noise.draw_noise).
            compile: run the network through torch.compile (a CUDA graph on CUDA); the first
                call compiles.
            progress: called after each step is queued (nothing is read from the device).
            options: the sampler's (ddpm.samplers.make_sampler): steps (network calls of ddim
                and dpmpp_2m, in [1, T], default T), eta (DDIM's share of fresh noise per
                step, in [0, 1], default 0), clip_denoised (clip each step's x0 estimate to
                [-1, 1], as the DDPM reference code does; default on, off gives the samplers
                as printed). The samplers on sigma take steps (default 18, EDM's CIFAR-10
                choice), rho, sigma_min and sigma_max (default: sigma_range), s_churn,
                s_tmin, s_tmax and s_noise (ddpm.sigma_samplers.make_sigma_sampler).

        Returns:
            (B, C, H, W) float samples clamped to [-1, 1].

        Raises:
            ValueError: for a sampler on timesteps with the edm formulation, or bad options.
        """
        if sampler in SIGMA_SAMPLERS:
            return self._sample_on_sigma(
                (num_samples, *size), sampler, generator, compile, progress, options
            )
        if self.formulation == "edm":
            raise ValueError(
                f"sampler {sampler} steps through the discrete formulation's timesteps; an edm "
                f"model is sampled with one of {SIGMA_SAMPLERS}"
            )
        method = make_sampler(sampler, self.alphas_cumprod_f64, self.prediction, **options)
        network = self.network(compile)
        device = self.betas.device
        x = draw_noise((num_samples, *size), generator, device)  # x_T ~ N(0, I)
        step_gen = step_generator(generator, device) if method.stochastic else None
        last = len(method.timesteps) - 1
        for i, t in enumerate(method.timesteps):
            t_batch = torch.full((num_samples,), t, device=x.device, dtype=torch.long)
            output = network(x, t_batch)
            noise = None
            if method.stochastic and i < last:
                noise = draw_noise(x.shape, step_gen, device)
            x = method.step(i, output, x, noise)
            if progress is not None:
                progress()
        return x.clamp(-1.0, 1.0)

    def _sample_on_sigma(
        self,
        shape: Sequence[int],
        sampler: str,
        generator: Generators,
        compile: bool,
        progress: Callable[[], None] | None,
        options: dict[str, Any],
    ) -> torch.Tensor:
        """sample with a sampler on sigma: x = sigma_max z, integrated in float64 to sigma = 0
        (the network itself runs in float32, or in the caller's autocast)."""
        options = {k: v for k, v in options.items() if k != "eta"}  # DDIM's
        steps, clip = options.pop("steps", None), options.pop("clip_denoised", True)
        low, high = self.sigma_range()
        low, high = options.pop("sigma_min", None) or low, options.pop("sigma_max", None) or high
        method = make_sigma_sampler(sampler, 18 if steps is None else steps, low, high, **options)
        network = self._network_at(compile)
        device = self.betas.device
        x = draw_noise(shape, generator, device).double() * method.sigmas[0]
        step_gen = step_generator(generator, device) if method.stochastic else None

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            return self.denoise(x, sigma, network, clip)

        def noise() -> torch.Tensor:
            return draw_noise(x.shape, step_gen, device).double()

        x = method.sample(denoise, x, noise if method.stochastic else None, progress)
        return x.float().clamp(-1.0, 1.0)
