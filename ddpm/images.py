"""Sample grids as PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from ddpm.data import denormalize
from ddpm.files import atomic_write


def sample_grid(x: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """Tile images into one grid image.

    Args:
        x: (B, C, H, W) float images in [-1, 1].
        nrow: images per row; default ceil(sqrt(B)).

    Returns:
        (C', H', W') float grid in [0, 1] on the CPU (C' = 3 for 1- or 3-channel input).
    """
    nrow = nrow or math.ceil(math.sqrt(x.shape[0]))
    return make_grid(denormalize(x.detach().float().cpu()), nrow=nrow, padding=2)


def save_grid(x: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Save images in [-1, 1] as one PNG grid, atomically; returns path."""
    grid = sample_grid(x, nrow)
    return atomic_write(Path(path), lambda f: save_image(grid, f, format="png"))
