"""Image folders: PNG/JPEG files under a folder, scanned in one pass, checked, and decoded to
uint8 (C, H, W) squares by the one transform that prepared datasets share (load_image).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch
from torch.utils.data import Dataset

from ddpm.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class ImageFolderDataset(Dataset):
    """PNG/JPEG images under a folder (recursively), resized and center-cropped to a square.

    Files that are not images, or images PIL cannot open, are skipped with one warning that
    counts them.

    Args:
        folder: the folder to search.
        image_size: side of the square output in px.
        channels: 3 (RGB) or 1 (grayscale).

    Items are (channels, image_size, image_size) uint8 tensors.
    """

    def __init__(self, folder: Path, image_size: int, channels: int = 3) -> None:
        self.folder, self.image_size = Path(folder), image_size
        self.mode = {1: "L", 3: "RGB"}.get(channels)
        if self.mode is None:
            raise ValueError(f"image folders support 1 or 3 channels, got {channels}")
        if not self.folder.is_dir():
            raise DatasetError(f"{self.folder}: image folder does not exist")
        images, others = scan_folder(self.folder)
        self.paths: list[Path] = []
        skipped = [f.name for f in others if not f.hidden]
        for f in images:
            if _readable_image(self.folder / f.name):
                self.paths.append(self.folder / f.name)
            else:
                skipped.append(f.name)
        skipped = [self.folder / n for n in sorted(skipped, key=lambda n: n.split("/"))]
        if skipped:
            names = ", ".join(str(p.relative_to(self.folder)) for p in skipped[:3])
            more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
            log.warning("%s: skipped %d unreadable or non-image files (%s%s)", self.folder,
                        len(skipped), names, more)  # fmt: skip
        if not self.paths:
            raise DatasetError(f"{self.folder}: no readable PNG or JPEG images found")
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image index, resized and cropped: (C, image_size, image_size) uint8. An image that
        passed the scan but cannot be decoded (damaged inside: verify() reads no pixels) is
        named in one warning and stands in as the next image that decodes, every time, so the
        batches stay a function of (seed, epoch)."""
        for offset in range(len(self.paths)):
            i = (index + offset) % len(self.paths)
            try:
                return self._load(self.paths[i])
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, its own
                if i not in self._unreadable:
                    self._unreadable.add(i)
                    log.warning("%s cannot be decoded (%s); the next image stands in for it",
                                self.paths[i], " ".join(str(err).split())[:200])  # fmt: skip
        raise DatasetError(f"{self.folder}: no image in it can be decoded")

    def _load(self, path: Path) -> torch.Tensor:
        return load_image(path, self.image_size, self.mode)


def load_image(file: Path | BinaryIO, image_size: int, mode: str) -> torch.Tensor:
    """An image file (a path or an open binary file) as the training images are: converted to
    `mode` ("RGB" or "L"), its short side resized to image_size (bicubic), center-cropped to a
    square: (C, image_size, image_size) uint8. The one transform of image folders and of
    prepared datasets (ddpm.prepare), so both give the same tensors."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(file) as img:
        img = img.convert(mode)
        img = TF.resize(img, image_size, interpolation=TF.InterpolationMode.BICUBIC)
        img = TF.center_crop(img, [image_size, image_size])
        return TF.pil_to_tensor(img)  # (C, H, W) uint8


class FileStat(NamedTuple):
    """A file under a scanned folder: its path relative to the folder (with /), size, mtime."""

    name: str
    size: int
    mtime_ns: int

    @property
    def hidden(self) -> bool:
        """A dot file (`.DS_Store`, `._photo.png`): not named when skipped."""
        return self.name.rsplit("/", 1)[-1].startswith(".")


def scan_folder(folder: Path) -> tuple[list[FileStat], list[FileStat]]:
    """The files under folder (recursively; links to folders not followed, as Path.rglob),
    in Path order (by their parts), split into PNG/JPEG images (by suffix) and the others;
    one scandir pass, no file opened (100,000 files in about a second).

    Returns:
        (images, others).
    """
    files: list[FileStat] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(os.path.join(folder, relative)) as entries:
            for entry in entries:
                name = f"{relative}/{entry.name}" if relative else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(name)
                    elif entry.is_file():
                        st = entry.stat()
                        files.append(FileStat(name, st.st_size, st.st_mtime_ns))
                except OSError:  # a link to itself, a file gone since: not a file, as for rglob
                    continue
    files.sort(key=lambda f: f.name.split("/"))
    images: list[FileStat] = []
    others: list[FileStat] = []
    for f in files:
        (images if os.path.splitext(f.name)[1].lower() in IMAGE_SUFFIXES else others).append(f)
    return images, others


def _readable_image(path: Path) -> bool:
    """Whether PIL reads the file's header and structure (not its pixels), and a JPEG ends with
    its end-of-image marker (a truncated one does not; verify() does not look)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            jpeg = img.format == "JPEG"
            img.verify()
        if jpeg:
            with open(path, "rb") as f:
                f.seek(-2, os.SEEK_END)
                return f.read(2) == b"\xff\xd9"
    except Exception:  # OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return False
    return True
