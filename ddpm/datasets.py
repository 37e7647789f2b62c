"""A run's training images as uint8 (C, H, W) datasets: where they are (CIFAR-10 downloaded
under data.root, an image folder, a prepared dataset local or fetched), loaded in memory or read
by batch, cut to data.subset, and their sigma_data.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from ddpm.cifar10 import download_cifar10, load_cifar10
from ddpm.config import Config, DataConfig
from ddpm.edm import measure_sigma_data
from ddpm.errors import DatasetError
from ddpm.image_folders import ImageFolderDataset
from ddpm.prepared import PreparedError, PreparedImages, fetch, is_url, read_manifest


class TensorImageDataset(Dataset):
    """uint8 images already in memory, e.g. CIFAR-10: (N, C, H, W) -> items (C, H, W)."""

    _on_device: torch.Tensor | None = None

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def on(self, device: torch.device | str) -> torch.Tensor:
        """The images as one uint8 tensor on device, copied there once and kept."""
        device = torch.device(device)
        if self.images.device == device:
            return self.images
        if self._on_device is None or self._on_device.device != device:
            self._on_device = self.images.to(device)
        return self._on_device


def subset_indices(num_items: int, subset: int, seed: int) -> list[int]:
    """`subset` indices out of num_items chosen from `seed` (sorted); all when subset is 0.

    Raises:
        ValueError: if subset is larger than the dataset.
    """
    if subset < 0 or subset > num_items:
        raise ValueError(f"subset must be in [0, {num_items}] for this dataset, got {subset}")
    if subset == 0:
        return list(range(num_items))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_items, generator=generator)[:subset].tolist())


# ---------------------------------------------------------------------------------------------
# A run's data


def locate_dataset(data: DataConfig) -> Path:
    """Where the dataset is: CIFAR-10 downloaded and verified under data.root, or data.folder.

    Raises:
        DatasetError: if it cannot be had; the message says where to put it.
    """
    if data.dataset == "cifar10":
        return download_cifar10(Path(data.root), data.url)
    if data.dataset == "prepared" and is_url(data.folder):
        return fetch_prepared(str(data.folder), Path(data.root))
    if data.dataset in ("folder", "prepared"):
        if data.folder is None or not Path(data.folder).is_dir():
            raise DatasetError(f"{data.dataset} folder {data.folder} does not exist; set "
                               "data.folder")  # fmt: skip
        return Path(data.folder)
    raise ValueError(f"unknown dataset {data.dataset!r}; expected cifar10, folder or prepared")


def fetch_prepared(url: str, root: Path) -> Path:
    """The prepared dataset at url copied under root/remote/ (ddpm.prepared.fetch); its local
    folder.

    Raises:
        DatasetError: naming the URL; transient when the store could not be reached."""
    out = root / "remote" / hashlib.sha256(url.encode()).hexdigest()[:16]
    try:
        return fetch(url, out)
    except PreparedError as err:
        raise DatasetError(str(err)) from None
    except OSError as err:
        raise DatasetError(f"data.folder {url}: cannot be read ({err})", transient=True) from err


SIGMA_DATA_IMAGES = 2000  # images sigma_data is measured on: its std error is ~1e-4 there


def sigma_data_of(dataset: Dataset) -> float:
    """EDM's sigma_data: the standard deviation of the training images in [-1, 1], measured on
    up to SIGMA_DATA_IMAGES of them spread evenly over the dataset (the same ones every time,
    so a resumed run measures the same value; ddpm.edm.measure_sigma_data)."""
    n = len(dataset)
    if n == 0:
        raise DatasetError("no training images to measure diffusion.sigma_data on")
    count = min(n, SIGMA_DATA_IMAGES)
    indices = [i * n // count for i in range(count)]
    if isinstance(dataset, TensorImageDataset):
        return measure_sigma_data(dataset.images[indices])
    return measure_sigma_data(torch.stack([dataset[i] for i in indices]))


def load_dataset(config: Config, path: Path) -> Dataset:
    """The training images found at path (see locate_dataset): CIFAR-10 in memory, or an image
    folder read lazily, each cut to data.subset images chosen from train.seed.

    Items are uint8 (model.channels, data.image_size, data.image_size).

    Raises:
        DatasetError: if data.subset asks for more images than path holds.
    """
    data, seed = config.data, config.train.seed
    if data.dataset == "cifar10":
        images: Dataset = TensorImageDataset(load_cifar10(Path(path)))
    elif data.dataset == "prepared":
        images = prepared_dataset(Path(path), data.image_size, config.model.channels)
    else:
        images = ImageFolderDataset(Path(path), data.image_size, config.model.channels)
    if data.subset > len(images):
        raise DatasetError(
            f"data.subset is {data.subset} but {path} holds {len(images)} images; "
            "lower data.subset (0 = all)"
        )
    if data.subset == 0:
        return images
    indices = subset_indices(len(images), data.subset, seed)
    if isinstance(images, TensorImageDataset):
        return TensorImageDataset(images.images[indices])
    return Subset(images, indices)


class PreparedDataset(Dataset):
    """A prepared dataset too large to hold in memory, read memory-mapped (ddpm.prepared): items
    (C, H, W) uint8; a DataLoader's batch is one gather (__getitems__)."""

    def __init__(self, images: PreparedImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images.gather([index])[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return list(self.images.gather(indices).unbind(0))


def memory_limit() -> int:
    """Bytes of memory this process may use: the machine's, or less where a limit is set for
    it: its cgroup's (v2 memory.max, v1 memory.limit_in_bytes, the nearest limited ancestor
    included) or its address space's (ulimit -v)."""
    import resource

    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            root, name = Path("/sys/fs/cgroup"), "memory.max"
        elif "memory" in controllers.split(","):
            root, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        else:
            continue
        folder = root / path.lstrip("/")
        while True:  # the group's limit, or an ancestor's (a container sees only its own root)
            with contextlib.suppress(OSError, ValueError):
                value = (folder / name).read_text().strip()
                if value != "max":
                    limits.append(int(value))
            if folder == root:
                break
            folder = folder.parent
    return min(limits)


def prepared_dataset(
    folder: Path, image_size: int, channels: int, memory_fraction: float = 0.25
) -> Dataset:
    """The prepared dataset in folder: in memory (like CIFAR-10) when its images take at most
    memory_fraction of the memory this process may use (memory_limit: a cgroup's or ulimit's
    limit counts), else read by batch: memory-mapped up to half of it, by pread beyond (see
    PreparedImages' random_access).

    Raises:
        DatasetError: naming the folder if it is damaged or holds images of another shape.
    """
    try:
        manifest = read_manifest(folder)
        shape, count = tuple(manifest["shape"]), int(manifest["count"])
        if shape != (channels, image_size, image_size):
            raise DatasetError(f"{folder} holds images of {shape}, not "
                               f"{(channels, image_size, image_size)}")  # fmt: skip
        nbytes = count * channels * image_size * image_size
        memory = memory_limit()
        in_memory = nbytes <= memory_fraction * memory
        images = PreparedImages(folder, random_access=not in_memory and nbytes > memory / 2)
    except PreparedError as err:
        raise DatasetError(str(err)) from None
    if not in_memory:
        return PreparedDataset(images)
    loaded = TensorImageDataset(images.load())
    images.close()
    return loaded
