"""Sampling's noise, drawn from seeded generators: one generator for a batch, or one per image.

A generator draws on its own device and the noise is moved to where it is used, so one seed
gives the same noise whatever the model's device; with one generator per image, image i's noise
depends on generator i alone, not on the batch it is drawn in. Per-step noise is drawn on the
model's device from generators seeded there (step_generator), so no step waits for a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Generators", "draw_noise", "step_generator"]

# One generator for a batch, or one per image (see draw_noise).
Generators = torch.Generator | Sequence[torch.Generator] | None


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether a and b name one device: torch.Generator("cuda") says `cuda`, a module on it
    says `cuda:0`."""

    def index(d: torch.device) -> int | None:
        if d.index is None and d.type == "cuda":
            return torch.cuda.current_device()
        return d.index

    return a.type == b.type and index(a) == index(b)


def draw_noise(shape: Sequence[int], generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard Gaussian noise on `device` (the model's), drawn from `generator` when given.

    A generator on another device (a CPU generator for a CUDA model, say) draws there and
    the noise is moved, so one seed gives the same noise whatever the model's device. A
    sequence of generators, one per image (shape[0] of them), draws each image's noise
    from its own: image i's noise then depends on generator i alone, not on the batch.
    """
    if generator is None:
        return torch.randn(*shape, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(*shape, generator=generator, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} images")
    per_image = [torch.randn(*shape[1:], generator=g, device=g.device) for g in generator]
    return torch.stack(per_image).to(device)


def step_generator(generator: Generators, device: torch.device) -> Generators:
    """The generator(s) for per-step noise on `device` (the model's): `generator` itself when
    it is on that device (or None); otherwise one there, seeded from it, so each step's noise
    is drawn where it is used (a CPU draw copied to a GPU would make every step wait). A
    sequence gives one per image, each seeded from its own."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        return [step_generator(g, device) for g in generator]  # type: ignore[misc]
    if _same_device(generator.device, device):
        return generator
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device).manual_seed(seed)
