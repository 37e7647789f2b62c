"""CIFAR-10 in the official python format: downloaded, verified (MD5) and read, offline
once extracted.

Batch files are unpickled by an unpickler that refuses anything but numpy arrays, so a planted
file runs none of its code.
"""

from __future__ import annotations

import logging
import os
import pickle
import uuid
from pathlib import Path
from typing import ClassVar

import torch
from filelock import FileLock

from ddpm.config import CIFAR10_URL
from ddpm.errors import DatasetError

log = logging.getLogger(__name__)

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # torchvision.datasets.CIFAR10.tgz_md5
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))


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
