"""Sample grids as PNG files, and images small enough to put into a web page."""

from __future__ import annotations

import io
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


def web_image(path: Path, max_bytes: int) -> tuple[str, bytes]:
    """An image file encoded for a web page (inline, as a data: URI) in at most max_bytes.

    A PNG that fits is kept byte for byte (its pixels exact); a larger image becomes a JPEG
    (quality 90: a sample grid's 32 px tiles keep their detail), halved in size until it fits.

    Args:
        path: a PNG file, e.g. a sample grid from save_grid.
        max_bytes: the most the encoded image may take.

    Returns:
        (media type, encoded bytes): ("image/png", the file's bytes) or ("image/jpeg", ...);
        over max_bytes only where halving has left an image 1 pixel wide or high.
    """
    from PIL import Image

    data = Path(path).read_bytes()
    if len(data) <= max_bytes and data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png", data
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    while True:
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        if out.tell() <= max_bytes or min(image.size) < 2:
            return "image/jpeg", out.getvalue()
        image = image.reduce(2)  # each pixel the mean of a 2x2 block
