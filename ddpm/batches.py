"""The per-epoch batches a training run draws from a dataset of uint8 images: normalised to
[-1, 1], flipped, and cut into each rank's slice of every global batch.

Shuffling and flips are drawn from a generator seeded by (seed, epoch), so the batches of an
epoch are the same whatever the number of loader workers and however often the run was
resumed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ddpm.config import Config
from ddpm.datasets import TensorImageDataset


@functools.cache
def _levels(device: torch.device) -> torch.Tensor:
    """(256,) float32: i / 127.5 - 1 for each uint8 value i, rounded once from float64."""
    return (torch.arange(256, dtype=torch.float64) / 127.5 - 1.0).float().to(device)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1], bit-identical on every device.

    A lookup, not arithmetic: CUDA divides by a scalar as a multiplication by its reciprocal,
    which rounds some values differently from the CPU's division.
    """
    return _levels(images.device)[images.long()]


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> float in [0, 1] (clamped), ready for saving."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def _normalize_flipped(images: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) uint8 -> float32 in [-1, 1], mirrored left-right where flip (B,) is True;
    on images' device. Both batch paths use it, so their batches are bit-identical."""
    x = normalize(images)
    if flip is None:
        return x
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator behind an epoch's order and flips: a function of (seed, epoch) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's slice of a global batch of n, as torch.chunk cuts it: ceil(n / k)
    each, the last ranks shorter (or empty when n < k)."""
    chunk = -(-n // world_size)
    lo = min(rank * chunk, n)
    return lo, min(lo + chunk, n)


def epoch_slices(
    num_items: int, batch_size: int, start_batch: int = 0, rank: int = 0, world_size: int = 1
) -> list[tuple[int, int]]:
    """[lo, hi) positions in an epoch's order of this rank's slice of each global batch, from
    batch start_batch on (one entry per global batch; empty where the batch has fewer images
    than ranks)."""
    slices = []
    for start in range(start_batch * batch_size, num_items, batch_size):
        lo, hi = shard_bounds(min(batch_size, num_items - start), rank, world_size)
        slices.append((start + lo, start + hi))
    return slices


class _EpochBatches(Sampler[list[int]]):
    """The current epoch's batches of dataset indices: this rank's slice of each global batch
    (empty slices skipped), set before each epoch.

    The DataLoader reads it in the main process whenever an epoch starts, so persistent workers
    never see it.
    """

    def __init__(self) -> None:
        self.order, self.slices = torch.arange(0), []

    def __iter__(self) -> Iterator[list[int]]:
        return iter([self.order[lo:hi].tolist() for lo, hi in self.slices if hi > lo])

    def __len__(self) -> int:
        return sum(hi > lo for lo, hi in self.slices)


class EpochLoader:
    """One DataLoader kept across epochs, for datasets read from disk (image folders).

    Its workers start once (by forkserver, since forked workers die inside Prefect flow runs)
    and serve every epoch: each `epoch()` sets the batches, then iterates. They only decode
    uint8 images; order and flips are drawn here from epoch_generator(seed, epoch), so batches
    do not depend on num_workers and equal device_epoch_batches'. In a data-parallel run each
    rank's loader decodes only its slice of each global batch.

    An epoch abandoned midway (the consumer stops, or raises) does not spoil the next one:
    the DataLoader drains its workers' leftover batches when the next epoch starts. Workers
    stop when the loader is garbage-collected.

    Args:
        dataset: items are uint8 (C, H, W).
        batch_size: images per global batch; the last batch of an epoch may be smaller.
        num_workers: DataLoader worker processes (0 = load in this process).
        pin_memory: page-lock the uint8 batches, so copies to a GPU are asynchronous.
        seed: with the epoch, selects the permutation and the flips.
        rank, world_size: this process's slice of each global batch (data-parallel runs).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.batch_size, self.pin_memory, self.seed = batch_size, pin_memory, seed
        self.rank, self.world_size = rank, world_size
        self.num_items = len(dataset)
        self.item_shape = tuple(dataset[0].shape) if world_size > 1 else ()
        self._batches = _EpochBatches()
        self._owner: object | None = None  # the running epoch; a stale one must not read on
        self.dataloader = DataLoader(
            dataset,
            batch_sampler=self._batches,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            multiprocessing_context="forkserver" if num_workers > 0 else None,
            # Its own generator: otherwise starting an epoch draws a seed from the global RNG,
            # which training's noise comes from, and a mid-epoch resume would draw it elsewhere.
            generator=torch.Generator().manual_seed(seed),
        )

    def epoch(
        self,
        epoch: int,
        *,
        random_flip: bool = True,
        start_batch: int = 0,
        device: torch.device | str = "cpu",
    ) -> Iterator[torch.Tensor]:
        """The normalised batches of one epoch, shuffled and flipped as a function of
        (seed, epoch).

        Each uint8 batch is copied to device (asynchronously when pinned), then normalised and
        flipped there: a quarter of the bytes a float32 copy would move.

        Args:
            epoch: with the seed, selects the permutation and the flips.
            random_flip: flip each image horizontally with probability 1/2.
            start_batch: skip the epoch's first batches (resuming mid-epoch).
            device: where the batches go.

        Yields:
            (B, C, H, W) float32 in [-1, 1], on device: this rank's slice of each global batch
            (B = 0 where the slice is empty).

        Raises:
            RuntimeError: when read on after a later epoch of this loader has started.
        """
        device = torch.device(device)
        generator = epoch_generator(self.seed, epoch)
        order = torch.randperm(self.num_items, generator=generator)
        flips = torch.rand(self.num_items, generator=generator) < 0.5  # k-th image of the epoch
        flips = flips.to(device)
        slices = epoch_slices(
            self.num_items, self.batch_size, start_batch, self.rank, self.world_size
        )
        self._batches.order, self._batches.slices = order, slices
        self._owner = owner = object()
        batches = iter(self.dataloader)
        for lo, hi in slices:
            if self._owner is not owner:
                raise RuntimeError(f"epoch {epoch} read on after a later epoch started")
            if hi == lo:
                yield torch.empty((0, *self.item_shape), device=device)
                continue
            images = next(batches).to(device, non_blocking=self.pin_memory)  # (B, C, H, W) uint8
            yield _normalize_flipped(images, flips[lo:hi] if random_flip else None)


def device_epoch_batches(
    images: torch.Tensor,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    random_flip: bool = True,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """The same batches as EpochLoader.epoch, from uint8 images already on the training device.

    Each batch is gathered, flipped and normalised on the device: no DataLoader, no workers,
    no host-to-device copy per step. Order and flips come from the same (seed, epoch)
    generator, so both paths give identical batches.

    Args:
        images: (N, C, H, W) uint8 on the training device.
        rank, world_size: yield this rank's slice of each global batch.

    Yields:
        (B, C, H, W) float32 in [-1, 1] on images' device.
    """
    n = images.shape[0]
    generator = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=generator).to(images.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    for lo, hi in epoch_slices(n, batch_size, start_batch, rank, world_size):
        yield _normalize_flipped(images[order[lo:hi]], flips[lo:hi] if random_flip else None)


def fits_on(device: torch.device, nbytes: int, fraction: float = 0.25) -> bool:
    """Whether nbytes may live on device: always on the CPU (the data is in memory already);
    on CUDA, within `fraction` of the memory free now."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    """Batches in one epoch (the last one may be smaller)."""
    return -(-num_items // batch_size)


class TrainingData:
    """A run's training images and the batches of each of its epochs, on the training device.

    data.loader auto keeps an in-memory dataset (CIFAR-10) on the training device when it takes
    at most a quarter of its free memory, and reads anything else (image folders) with one
    EpochLoader whose workers serve every epoch; device insists on the first, dataloader on
    the second. Either way the batches are identical, normalised and flipped on the device.

    Args:
        dataset: items uint8 (C, H, W), from load_dataset.
        config: data (random_flip, num_workers, loader) and train (batch_size, seed, device).
        rank, world_size: yield only this rank's slice of each global batch (data-parallel).

    Raises:
        ValueError: for data.loader="device" with a dataset that is not in memory.
    """

    def __init__(
        self, dataset: Dataset, config: Config, rank: int = 0, world_size: int = 1
    ) -> None:
        self.dataset, self.data, self.train = dataset, config.data, config.train
        self.augment_labels = config.model.augment_labels
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(config.train.device)
        in_memory = isinstance(dataset, TensorImageDataset)
        if self.data.loader == "device" and not in_memory:
            raise ValueError("data.loader=device needs an in-memory dataset (cifar10)")
        self.on_device = in_memory and (
            self.data.loader == "device"
            or (self.data.loader == "auto" and fits_on(self.device, dataset.images.nbytes))
        )
        self._loader: EpochLoader | None = None  # started with the first epoch that needs it

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.dataset), self.train.batch_size)

    def batch_size_at(self, index: int) -> int:
        """Images in the epoch's global batch `index` (from 0): the last one may be short."""
        return min(self.train.batch_size, len(self.dataset) - index * self.train.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """The batches of epoch `epoch` (from 1), from batch start_batch on.

        Yields:
            (B, C, H, W) float32 in [-1, 1] on the training device: this rank's slice of each
            global batch (the whole batch for one process).
        """
        # With augmentation labels the training step flips and labels the images itself.
        flip = self.data.random_flip and not self.augment_labels
        batch_size, seed = self.train.batch_size, self.train.seed
        shard = {"rank": self.rank, "world_size": self.world_size}
        if self.on_device:
            images = self.dataset.on(self.device)
            return device_epoch_batches(
                images, batch_size, seed=seed, epoch=epoch, random_flip=flip,
                start_batch=start_batch, **shard,
            )  # fmt: skip
        if self._loader is None:
            self._loader = EpochLoader(
                self.dataset,
                batch_size,
                num_workers=self.data.num_workers,
                pin_memory=self.device.type == "cuda",
                seed=seed,
                **shard,
            )
        return self._loader.epoch(
            epoch, random_flip=flip, start_batch=start_batch, device=self.device
        )

    def close(self) -> None:
        """Stop the loader's workers, if any (they also stop when this is garbage-collected)."""
        self._loader = None
