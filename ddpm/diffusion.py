"""Gaussian diffusion (Ho et al. 2020) around any noise-predicting network.

Timesteps are 0-indexed: t in {0, ..., T-1}, betas[t] = linspace(beta_start, beta_end, T)[t]. The
network is given (t + 1) / T, a float in (0, 1].
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def linear_beta_schedule(
    beta_start: float, beta_end: float, num_timesteps: int
) -> dict[str, torch.Tensor]:
    """The linear beta schedule and the quantities derived from it, computed in float64.

    Args:
        beta_start: beta_1 (1e-4 in the DDPM paper), in (0, 1).
        beta_end: beta_T (0.02 in the DDPM paper), in (beta_start, 1).
        num_timesteps: T, at least 1.

    Returns:
        name -> (T,) float64 tensor: betas, alphas_cumprod, alphas_cumprod_prev,
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, posterior_variance (beta~_t,
        eq. 7; 0 at t = 0), posterior_mean_coef1 and posterior_mean_coef2 (the weights of x0
        and x_t in the posterior mean mu~_t, eq. 7).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(
            f"betas must satisfy 0 < beta_start < beta_end < 1, got ({beta_start}, {beta_end})"
        )
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
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


# model -> {step name: compiled step}; kept outside the module, so copies (the EMA is a
# deepcopy) never share another model's compiled steps, and dropped with the model.
# One generator for a batch, or one per image (see DiffusionModel._noise).
Generators = torch.Generator | Sequence[torch.Generator] | None

_COMPILED_STEPS: weakref.WeakKeyDictionary[nn.Module, dict[str, Callable[..., torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether a and b name one device: torch.Generator("cuda") says `cuda`, a module on it
    says `cuda:0`."""

    def index(d: torch.device) -> int | None:
        if d.index is None and d.type == "cuda":
            return torch.cuda.current_device()
        return d.index

    return a.type == b.type and index(a) == index(b)


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


class DiffusionModel(nn.Module):
    """A DDPM: the forward (noising) process, the training loss, and two samplers.

    Args:
        eps_model: network (x_t: (B, C, H, W), t: (B,) float in (0, 1]) -> eps estimate
            (B, C, H, W).
        betas: (beta_start, beta_end) of the linear schedule.
        num_timesteps: T.
    """

    def __init__(
        self,
        eps_model: nn.Module,
        betas: tuple[float, float] = (1e-4, 0.02),
        num_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        self.eps_model = eps_model
        self.num_timesteps = num_timesteps
        self.betas_range = (float(betas[0]), float(betas[1]))
        for name, values in linear_beta_schedule(*self.betas_range, num_timesteps).items():
            self.register_buffer(name, values.to(torch.float32))

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

    def draw_training_noise(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t ~ U{0..T-1} (B,) and eps ~ N(0, I) like x0, from the global generator of x0's
        device (t first, then eps: a data-parallel run draws them for the global batch)."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        return t, torch.randn_like(x0)

    def forward(
        self, x0: torch.Tensor, t: torch.Tensor | None = None, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The simplified training loss L_simple (DDPM eq. 14).

        Args:
            x0: (B, C, H, W) clean images in [-1, 1].
            t, eps: (B,) timesteps and (B, C, H, W) noise; drawn here when not given.

        Returns:
            scalar: mean squared error between the true noise eps ~ N(0, I) and its estimate,
            at timesteps t drawn uniformly from [0, T) on x0's device.
        """
        if t is None or eps is None:
            t, eps = self.draw_training_noise(x0)
        x_t = self.q_sample(x0, t, eps)
        return F.mse_loss(self.eps_model(x_t, self._net_time(t)), eps)

    def _noise(self, shape: Sequence[int], generator: Generators) -> torch.Tensor:
        """Standard Gaussian noise on the module's device, drawn from `generator` when given.

        A generator on another device (a CPU generator for a CUDA model, say) draws there and
        the noise is moved, so one seed gives the same noise whatever the model's device. A
        sequence of generators, one per image (shape[0] of them), draws each image's noise
        from its own: image i's noise then depends on generator i alone, not on the batch.
        """
        device = self.betas.device
        if generator is None:
            return torch.randn(*shape, device=device)
        if isinstance(generator, torch.Generator):
            return torch.randn(*shape, generator=generator, device=generator.device).to(device)
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} images")
        per_image = [torch.randn(*shape[1:], generator=g, device=g.device) for g in generator]
        return torch.stack(per_image).to(device)

    def _step_generator(self, generator: Generators) -> Generators:
        """The generator(s) for per-step noise: `generator` itself when it is on the module's
        device (or None); otherwise one there, seeded from it, so each step's noise is drawn
        where it is used (a CPU draw copied to a GPU would make every step wait). A sequence
        gives one per image, each seeded from its own."""
        device = self.betas.device
        if generator is None:
            return None
        if not isinstance(generator, torch.Generator):
            return [self._step_generator(g) for g in generator]  # type: ignore[misc]
        if _same_device(generator.device, device):
            return generator
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        return torch.Generator(device).manual_seed(seed)

    def predict_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, clip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0_hat from x_t and the predicted noise (DDPM eq. 4 solved for x0), and the noise
        consistent with it.

        With `clip`, x0_hat is clipped to the data range [-1, 1], as the DDPM reference code
        does when sampling (`clip_denoised`), and eps is recomputed from the clipped x0_hat, so
        x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps still holds. Near t = T, x0_hat divides
        by sqrt(abar_T) ~ 0.006 and every error in eps is magnified about 150 times: unclipped,
        those errors survive to the image as noise.

        Args:
            x_t: (B, C, H, W).
            t: (B,) long timesteps in [0, T).
            eps: (B, C, H, W) the network's noise estimate.
            clip: clip x0_hat to [-1, 1].

        Returns:
            (x0_hat, eps), both (B, C, H, W).
        """
        sqrt_abar = extract(self.sqrt_alphas_cumprod, t, x_t.ndim)
        sqrt_one_minus_abar = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        x0_hat = (x_t - sqrt_one_minus_abar * eps) / sqrt_abar
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            eps = (x_t - sqrt_abar * x0_hat) / sqrt_one_minus_abar
        return x0_hat, eps

    def _ancestral_step(
        self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, clip: bool = True
    ) -> torch.Tensor:
        """x_t -> x_{t-1} (DDPM Algorithm 2, line 4, with sigma_t^2 = beta_t).

        Tensors only, so one compiled graph serves every t. The mean is written as the
        posterior mean mu~_t(x_t, x0_hat) of eq. 7, which equals Algorithm 2's
        1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) when x0_hat is not clipped.

        Args:
            x_t: (B, C, H, W).
            t: (B,) long timesteps in [0, T).
            z: (B, C, H, W) standard Gaussian noise; not added where t = 0.
            clip: clip x0_hat to [-1, 1] (see predict_x0).

        Returns:
            (B, C, H, W) x_{t-1}.
        """
        eps = self.eps_model(x_t, self._net_time(t))
        x0_hat, _ = self.predict_x0(x_t, t, eps, clip)
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.ndim) * x0_hat
            + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        )
        sigma = extract(self.betas, t, x_t.ndim).sqrt() * (t > 0).reshape(-1, 1, 1, 1)
        return mean + sigma * z

    def _ddim_step(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        clip: bool = True,
        eta: float = 0.0,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t -> x_{t_prev} (DDIM, Song et al. 2021, eq. 12); t_prev = -1 means the end
        (abar_prev = 1).

        Args:
            x_t: (B, C, H, W).
            t, t_prev: (B,) long timesteps, t_prev < t.
            clip: clip x0_hat to [-1, 1] and use the eps consistent with it (see predict_x0).
            eta: 0 = deterministic (the probability-flow ODE); 1 = the ancestral step over
                [t_prev, t], with the posterior variance of eq. 7.
            z: (B, C, H, W) standard Gaussian noise, used when eta > 0.

        Returns:
            (B, C, H, W) x_{t_prev}.
        """
        eps = self.eps_model(x_t, self._net_time(t))
        abar_prev = torch.where(
            t_prev.reshape(-1, 1, 1, 1) >= 0,
            extract(self.alphas_cumprod, t_prev.clamp(min=0), x_t.ndim),
            1.0,
        )
        # Song et al. 2021, eq. 12: predict x0, then move it to the previous noise level.
        x0_hat, eps = self.predict_x0(x_t, t, eps, clip)
        if eta == 0 or z is None:
            return abar_prev.sqrt() * x0_hat + (1.0 - abar_prev).sqrt() * eps
        # eq. 16: sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)
        abar_t = extract(self.alphas_cumprod, t, x_t.ndim)
        variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
        sigma = eta * variance.clamp(min=0).sqrt()
        direction = (1.0 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        return abar_prev.sqrt() * x0_hat + direction + sigma * z

    def _stepper(self, name: str, compile: bool) -> Callable[..., torch.Tensor]:
        """The sampler step `name`, eager or torch.compile'd (compiled once per module).

        On CUDA the compiled step is captured as a CUDA graph (mode "reduce-overhead"): one
        replay per step instead of a launch per kernel, which is what bounds a small network's
        sampling speed.
        """
        if not compile:
            return getattr(self, name)
        compiled = _COMPILED_STEPS.setdefault(self, {})
        if name not in compiled:
            cuda = self.betas.device.type == "cuda"
            # The function, not the bound method: the cache must not hold the model alive.
            compiled[name] = torch.compile(
                getattr(type(self), name), mode="reduce-overhead" if cuda else None, dynamic=False
            )
        fn = compiled[name]

        def run(*args: torch.Tensor | bool | float | None) -> torch.Tensor:
            # A CUDA graph's outputs are overwritten by its next replay: copy x out.
            torch.compiler.cudagraph_mark_step_begin()
            return fn(self, *args).clone()

        return run

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        size: Sequence[int],
        *,
        generator: Generators = None,
        compile: bool = False,
        clip_denoised: bool = True,
        progress: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Draw samples with the ancestral sampler (DDPM Algorithm 2), on the module's device.

        Args:
            num_samples: B.
            size: (C, H, W) of one image.
            generator: source of all noise; the same seed gives the same samples on one kind
                of device. x_T is drawn from it wherever it is; the per-step noise on the
                module's device (see _step_generator). A sequence of B generators gives each
                image noise of its own (see _noise).
            compile: run each step through torch.compile (a CUDA graph on CUDA); the first
                call compiles.
            clip_denoised: clip each step's x0_hat to [-1, 1], as the DDPM reference code
                does (see predict_x0); off gives Algorithm 2 as printed.
            progress: called after each step is queued (nothing is read from the device).

        Returns:
            (B, C, H, W) float samples clamped to [-1, 1].
        """
        step = self._stepper("_ancestral_step", compile)
        x = self._noise((num_samples, *size), generator)  # x_T ~ N(0, I)
        step_generator = self._step_generator(generator)
        for t in reversed(range(self.num_timesteps)):
            t_batch = torch.full((num_samples,), t, device=x.device, dtype=torch.long)
            z = self._noise(x.shape, step_generator) if t > 0 else torch.zeros_like(x)
            x = step(x, t_batch, z, clip_denoised)
            if progress is not None:
                progress()
        return x.clamp(-1.0, 1.0)

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps spread evenly over [0, T), descending from T-1 to 0."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"DDIM steps must be in [1, {self.num_timesteps}], got {steps}")
        grid = torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64)
        return sorted({int(v) for v in grid.round().tolist()}, reverse=True)

    @torch.no_grad()
    def sample_ddim(
        self,
        num_samples: int,
        size: Sequence[int],
        steps: int = 50,
        *,
        generator: Generators = None,
        compile: bool = False,
        clip_denoised: bool = True,
        eta: float = 0.0,
        progress: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Draw samples with DDIM (Song et al. 2021, eq. 12) on `steps` of the T timesteps.

        Each step is
            x0_hat   = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
            x_{prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        with abar_prev = 1 after the last step. With eta = 0 (sigma = 0) only x_T is random and
        each step is an Euler step of the probability-flow ODE; with eta = 1 each step is
        ancestral, and DDIM on all T steps is DDPM with the posterior variance beta~_t.

        Args:
            num_samples: B.
            size: (C, H, W) of one image.
            steps: number of network evaluations, in [1, T].
            generator: source of all noise, as in sample.
            compile: as in sample.
            clip_denoised: clip each step's x0_hat to [-1, 1] and continue with the eps
                consistent with it (see predict_x0), as diffusers' DDIMScheduler does.
            eta: the share of fresh noise, in [0, 1] (eq. 16).
            progress: as in sample.

        Returns:
            (B, C, H, W) float samples clamped to [-1, 1].
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
        step = self._stepper("_ddim_step", compile)
        timesteps = self.ddim_timesteps(steps)
        x = self._noise((num_samples, *size), generator)
        step_generator = self._step_generator(generator) if eta > 0 else None
        for t, t_prev in zip(timesteps, [*timesteps[1:], -1], strict=True):
            t_batch = torch.full((num_samples,), t, device=x.device, dtype=torch.long)
            z = self._noise(x.shape, step_generator) if eta > 0 and t_prev >= 0 else None
            x = step(x, t_batch, torch.full_like(t_batch, t_prev), clip_denoised, eta, z)
            if progress is not None:
                progress()
        return x.clamp(-1.0, 1.0)
