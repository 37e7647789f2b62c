"""Images as PNG files: sample grids, the numbered images of a generated folder (ImageFiles),
which a re-run resumes and FID tools read as one .npz, and images small enough to put into a
web page (web_image).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ddpm.batches import denormalize
from ddpm.errors import UserError, first_line
from ddpm.files import (
    SAMPLES_MARKER,
    atomic_write,
    claim_samples_folder,
    damaged,
    read_json,
    write_checked_json,
)

OPTIONS_FILE = SAMPLES_MARKER  # what drew a folder's images; a re-run must match it


def sample_grid(x: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """Tile images into one grid image.

    Args:
        x: (B, C, H, W) float images in [-1, 1].
        nrow: images per row; default ceil(sqrt(B)).

    Returns:
        (C', H', W') float grid in [0, 1] on the CPU (C' = 3 for 1- or 3-channel input).
    """
    from torchvision.utils import make_grid

    nrow = nrow or math.ceil(math.sqrt(x.shape[0]))
    return make_grid(denormalize(x.detach().float().cpu()), nrow=nrow, padding=2)


def save_grid(x: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Save images in [-1, 1] as one PNG grid, atomically; returns path."""
    from torchvision.utils import save_image

    grid = sample_grid(x, nrow)
    return atomic_write(Path(path), lambda f: save_image(grid, f, format="png"))


class GenerationError(UserError):
    """The output folder holds images drawn another way."""


def aligned_batches(num: int, batch_size: int) -> Iterator[range]:
    """The batches of indices covering [0, num): [0, B), [B, 2B), ..., the last one cut at
    num, so only the images asked for are drawn. Each image's noise is its own (its seed and
    index); the batch it shares changes only float rounding (at most one grey level,
    measured in tests/ddpm/test_generate.py), and a resume draws the same batches."""
    for start in range(0, num, batch_size):
        yield range(start, min(start + batch_size, num))


class ImageFiles(Dataset):
    """A folder of generated images, DIR/000000.png ...: items uint8 (C, H, W).

    Args:
        folder: where the images are.
        num: how many (image i is folder/{i:06d}.png).
    """

    def __init__(self, folder: Path, num: int) -> None:
        self.folder, self.num = Path(folder), num

    def path(self, index: int) -> Path:
        return self.folder / f"{index:06d}.png"

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image index as uint8 (C, H, W).

        Raises:
            DamagedFile: naming the file, if it is not a readable image (torn, damaged).
        """
        from PIL import Image

        try:
            with Image.open(self.path(index)) as img:
                array = np.asarray(img)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, its own ...
            raise damaged(
                self.path(index), f"not a readable PNG: {first_line(err)}",
                "remove it and run the same command again: it is drawn again, from its own "
                "noise",
            ) from None  # fmt: skip
        array = array[:, :, None] if array.ndim == 2 else array
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def missing(self) -> int:
        """How many of the num images have no file yet."""
        return sum(not self.path(i).is_file() for i in range(self.num))

    def pending_batches(self, batch_size: int) -> list[range]:
        """The aligned batches with at least one image (below num) still to write."""
        return [
            indices
            for indices in aligned_batches(self.num, batch_size)
            if any(not self.path(i).is_file() for i in indices)
        ]

    def write(self, indices: range, images: torch.Tensor) -> int:
        """Write the images of indices below num that have no file yet, each atomically (a
        file is whole or absent); returns how many were written.

        Args:
            images: (len(indices), C, H, W) uint8.
        """
        from PIL import Image

        written = 0
        for index, image in zip(indices, images, strict=True):
            path = self.path(index)
            if index >= self.num or path.is_file():
                continue
            array = image.permute(1, 2, 0).numpy()
            pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
            atomic_write(path, lambda f, pil=pil: pil.save(f, format="png"))
            written += 1
        return written

    def write_npz(self) -> Path:
        """All num images in one uint8 (N, H, W, C) array `arr_0`, the layout improved-diffusion's
        and EDM's FID tools read: DIR/samples_NxHxWxC.npz, written atomically."""
        images = torch.stack([self[i] for i in range(self.num)]).permute(0, 2, 3, 1).numpy()
        path = self.folder / f"samples_{'x'.join(str(n) for n in images.shape)}.npz"
        buffer = io.BytesIO()
        np.savez(buffer, arr_0=images)
        return atomic_write(path, lambda f: f.write(buffer.getbuffer()))

    def claim(self, options: Mapping[str, Any]) -> None:
        """Record what draws this folder's images (OPTIONS_FILE), or check that a folder
        already holding images was drawn the same way, so a re-run resumes it and never mixes
        images of two models or seeds.

        Raises:
            NotOurs: if the folder holds files but no OPTIONS_FILE (the user's: untouched).
            GenerationError: naming the folder and what differs.
            DamagedFile: if its OPTIONS_FILE is damaged.
        """
        record = self.folder / OPTIONS_FILE
        if claim_samples_folder(self.folder):
            fix = "choose another --out, or empty this folder"
            saved = read_json(record, fix)
            changed = [
                f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in options.items() if saved.get(k) != v
            ]
            if changed:
                raise GenerationError(
                    f"{self.folder} holds images drawn with other options ({'; '.join(changed)}); "
                    "choose another output folder or empty this one"
                )
            return
        write_checked_json(record, dict(options))


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
