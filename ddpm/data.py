"""Datasets as uint8 images, and the per-epoch batches a training run draws from them.

Every dataset here yields uint8 (C, H, W) tensors. Shuffling and flips are drawn from a generator
seeded by (seed, epoch), so the batches of an epoch are the same whatever the number of loader
workers and however often the run was resumed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, ClassVar, NamedTuple

import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ddpm.config import CIFAR10_URL, Config, DataConfig
from ddpm.edm import measure_sigma_data
from ddpm.errors import UserError
from ddpm.prepared import PreparedError, PreparedImages, fetch, is_url, read_manifest

log = logging.getLogger(__name__)

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # torchvision.datasets.CIFAR10.tgz_md5
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class DatasetError(UserError, RuntimeError):
    """A dataset is missing, malformed or failed verification; the message names the file."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def _transient_download_error(err: BaseException) -> bool:
    """Whether a failed download may succeed when tried again: a timeout, a reset or refused
    connection, an HTTP 5xx or 429. A name that does not resolve, a 404 or a bad URL fail the
    same way every time."""
    import socket
    import urllib.error

    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code == 429
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, socket.gaierror):
        return False
    return isinstance(reason, (TimeoutError, ConnectionError))


# ---------------------------------------------------------------------------------------------
# CIFAR-10


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batch files and nothing else: a file that would import any other
    callable (a planted payload) is refused before any of its code runs."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar10_batch(path: Path) -> torch.Tensor:
    """Read one CIFAR-10 python batch file.

    Args:
        path: a `data_batch_N` file of the official python archive (any number of images).

    Returns:
        (N, 3, 32, 32) uint8 images.

    Raises:
        DatasetError: naming the file, if it is not a CIFAR-10 batch.
    """
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        data = batch[b"data"]
        images = torch.as_tensor(data)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing CIFAR-10 batch file") from None
    except Exception as err:  # pickle, key, type errors: all mean "not a batch file"
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({err})") from None
    if images.dtype != torch.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{path}: not a CIFAR-10 python batch (data is {images.dtype} "
            f"{tuple(images.shape)}, expected uint8 (N, 3072))"
        )
    return images.reshape(-1, 3, 32, 32).clone()  # rows are R, G, B planes of 32x32


def load_cifar10(folder: Path) -> torch.Tensor:
    """Read the five training batches of an extracted `cifar-10-batches-py` folder, offline.

    Returns:
        (N, 3, 32, 32) uint8 images, N = 50000 for the real dataset.
    """
    return torch.cat([read_cifar10_batch(Path(folder) / name) for name in CIFAR10_TRAIN_FILES])


def cifar10_is_extracted(root: Path) -> bool:
    """Whether `root/cifar-10-batches-py` holds the five training batch files."""
    folder = Path(root) / CIFAR10_DIR
    return all((folder / name).is_file() for name in CIFAR10_TRAIN_FILES)


def download_cifar10(root: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Make sure CIFAR-10 is extracted under root, downloading and verifying it if needed.

    An extracted folder is used as it is (no network). A verified archive is extracted. Otherwise
    the archive is downloaded; one that fails its MD5 check is removed and downloaded once more.

    Args:
        root: data folder; the archive goes to root/cifar-10-python.tar.gz and is extracted to
            root/cifar-10-batches-py.
        url: where to download the archive from.
        md5: the archive's expected MD5.

    Returns:
        the extracted folder.

    Raises:
        DatasetError: if the download fails or the archive fails its checksum twice; the message
            says where to put the archive or the extracted folder by hand. Its `transient`
            says whether trying again may help (a timeout, not a DNS failure).
    """
    root = Path(root)
    folder = root / CIFAR10_DIR
    if cifar10_is_extracted(root):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    # One process at a time (a sweep's trials start together): the others wait, then find it.
    with FileLock(root / ".cifar-10.lock"):
        return _download_cifar10(root, url, md5)


def _download_cifar10(root: Path, url: str, md5: str) -> Path:
    from torchvision.datasets.utils import check_integrity, download_url, extract_archive

    folder = root / CIFAR10_DIR
    if cifar10_is_extracted(root):
        return folder
    archive = root / "cifar-10-python.tar.gz"
    by_hand = (
        f"download {CIFAR10_URL} to {archive} (MD5 {md5}), or extract it so that "
        f"{folder}/data_batch_1..5 exist"
    )
    if archive.exists() and not check_integrity(str(archive), md5):
        raise DatasetError(
            f"{archive} fails its MD5 check (expected {md5}): it is not the official archive, "
            f"or it is damaged; it is left as it is: remove it to download the archive again, "
            f"or {by_hand}"
        )
    if not archive.exists():
        for attempt in (1, 2):
            partial = root / f".{archive.name}.{uuid.uuid4().hex[:12]}.part"  # ours alone
            try:
                download_url(url, str(root), partial.name)
            except Exception as err:
                partial.unlink(missing_ok=True)
                raise DatasetError(
                    f"could not download {url} ({err}); {by_hand}",
                    transient=_transient_download_error(err),
                ) from err
            if check_integrity(str(partial), md5):
                os.replace(partial, archive)
                break
            log.warning("%s failed its MD5 check (attempt %d of 2); removing it", url, attempt)
            partial.unlink(missing_ok=True)
        else:
            raise DatasetError(f"{archive} from {url} failed its MD5 check twice; {by_hand}")
    extract_archive(str(archive), str(root))
    if not cifar10_is_extracted(root):
        raise DatasetError(f"{archive}: archive does not hold {CIFAR10_DIR}; {by_hand}")
    return folder


# ---------------------------------------------------------------------------------------------
# Image folders


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


# ---------------------------------------------------------------------------------------------
# Subsets, normalisation, batches


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
