"""FID and KID of generated images against the training images, with torch-fidelity.

torch-fidelity's `inception-v3-compat` extractor is the PyTorch port of the 2015 TensorFlow
Inception graph that published FID/KID scores were computed with (TF1-style bilinear resize to
299 px, 2048-d pool features), so numbers here compare with papers when the official weights
are used.

The reference set's features and FID statistics are cached by torch-fidelity itself, as
`cache_dir/<reference_key>-inception-v3-compat-features-2048.pt` and
`...-stat-fid-2048.pt` (written atomically, read back with a full unpickler: keep cache_dir a
folder only this pipeline writes). Those names do not say which weights made the features,
so `reference_key` folds a hash of the weights file into the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ddpm.errors import UserError, first_line

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3 (0.4.0); a test pins the two equal
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
METRICS = ("fid", "kid")

KID_SUBSET_SIZE = 1000  # KID paper (Bińkowski et al. 2018) and torch-fidelity's default
_EXTRACTOR = "inception-v3-compat"  # the TF-Inception port; names torch-fidelity's cache files
_KEY_PATTERN = re.compile(r"[A-Za-z0-9._-]+")  # the key becomes part of a file name
_SETTING = "eval.weights (DDPM_EVAL__WEIGHTS)"
# (resolved path, mtime_ns, size) -> sha256 hex of a weights file; hashing the 95 MB file takes
# a fraction of a second, once per process and version
_SHA256: dict[tuple[str, int, int], str] = {}


class EvaluationError(UserError, RuntimeError):
    """Evaluation cannot run: e.g. the Inception weights are missing and cannot be downloaded."""


def reference_key(*parts: object, weights: Path | None) -> str:
    """A short stable cache key naming a reference set and the weights its features come from.

    Args:
        parts: what makes the reference set: dataset name, its resolved path, subset size, seed,
            image size ... Plain values (str, int, float, Path); each enters as its repr (a
            Path as its string), so the key is the same in every process.
        weights: the local Inception weights file, or None for torch-fidelity's download. The
            file enters as name, size and sha256, so statistics computed with other weights
            are never reused.

    Returns 'ref-' + 16 hex digits of a sha256 over all of it.
    """
    described = [os.fspath(p) if isinstance(p, os.PathLike) else repr(p) for p in parts]
    described.append(_weights_id(weights))
    digest = hashlib.sha256("\x1f".join(described).encode()).hexdigest()
    return f"ref-{digest[:16]}"


def compute_metrics(
    fake: Dataset | torch.Tensor,
    reference: Dataset,
    *,
    reference_key: str,
    cache_dir: Path,
    metrics: Sequence[str] = METRICS,
    weights: Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, float]:
    """FID and/or KID of `fake` against `reference`, in torch-fidelity's Inception features.

    Args:
        fake: the generated images: a Dataset of uint8 (C, H, W) tensors or a uint8 (N, C, H, W)
            tensor, C in {1, 3} (1 is repeated to RGB), any H, W (resized to 299 px); N >= 2.
        reference: the training images, a Dataset of uint8 (C, H, W) tensors; only its len() is
            used once its features are cached.
        reference_key: names the reference's cache entry (see reference_key()).
        cache_dir: where the reference's features and FID statistics are kept (created).
        metrics: any of "fid", "kid".
        weights: a local Inception weights file (INCEPTION_FILE); None downloads INCEPTION_URL
            into torch's hub cache (~/.cache/torch/hub/checkpoints) unless it is there.
        batch_size: images per Inception forward pass.
        device: "cpu" or "cuda[:N]".

    Returns {"fid": float, "kid": float, "kid_std": float}, only the metrics asked for. FID is
    >= 0 up to round-off (about -4e-6 for a set against itself, from the 2048-d eigenvalues).
    KID is the unbiased MMD² (it can be slightly below 0) averaged over 100 subsets of
    min(1000, len(fake), len(reference)) images; kid_std is its spread over the subsets (about 0
    when neither set is larger than the subset size: every subset is then the whole set).

    Raises EvaluationError (one line) when the weights file is missing or not loadable, or
    cannot be downloaded; ValueError for a bad metric, key, device or image set.
    """
    wanted = _check_metrics(metrics)
    if not _KEY_PATTERN.fullmatch(reference_key):
        raise ValueError(f"reference_key {reference_key!r} must match {_KEY_PATTERN.pattern}")
    fake = _RGBImages(fake)
    reference = _RGBImages(reference)
    if len(fake) < 2 or len(reference) < 2:
        raise ValueError(f"FID/KID need >= 2 images a side, got {len(fake)} and {len(reference)}")
    # torch-fidelity unpickles the weights with weights_only=False: it gets the very bytes
    # that were checked to hold only tensors, never the file again (which could change).
    checked = io.BytesIO(_checked(_weights_file(weights)))
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    import torch_fidelity

    with _on_device(device) as cuda:
        out = torch_fidelity.calculate_metrics(
            input1=fake,
            input2=reference,
            input2_cache_name=reference_key,  # only the reference is cached
            cache_root=os.fspath(cache_dir),
            cache=True,
            fid="fid" in wanted,
            kid="kid" in wanted,
            kid_subset_size=min(KID_SUBSET_SIZE, len(fake), len(reference)),
            feature_extractor=_EXTRACTOR,
            feature_extractor_weights_path=checked,
            batch_size=batch_size,
            cuda=cuda,
            save_cpu_ram=True,  # num_workers=0: a forked loader dies inside a Prefect flow run
            verbose=False,  # no progress bars or prints
        )
    return _rename(out)


def _check_metrics(metrics: Sequence[str]) -> set[str]:
    """The metric names asked for, each checked against METRICS."""
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; expected any of {METRICS}")
    if not names:
        raise ValueError(f"no metric asked for; expected any of {METRICS}")
    return set(names)


def _rename(out: dict[str, float]) -> dict[str, float]:
    """torch-fidelity's result keys -> fid, kid, kid_std."""
    names = {
        "frechet_inception_distance": "fid",
        "kernel_inception_distance_mean": "kid",
        "kernel_inception_distance_std": "kid_std",
    }
    return {names[k]: float(v) for k, v in out.items() if k in names}


class _RGBImages(Dataset):
    """Items of `images` checked to be uint8 (C, H, W), C in {1, 3}, and made (3, H, W).

    Nothing is read here beyond len(): a cached reference is never touched.
    """

    def __init__(self, images: Dataset | torch.Tensor) -> None:
        if isinstance(images, torch.Tensor) and (images.dtype != torch.uint8 or images.ndim != 4):
            raise ValueError(
                f"expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = self.images[index]
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 3:
            raise ValueError(f"image {index}: expected a uint8 (C, H, W) tensor, got {_kind(x)}")
        if x.shape[0] not in (1, 3):
            raise ValueError(f"image {index}: expected 1 or 3 channels, got {x.shape[0]}")
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x  # (3, H, W)


def _kind(x: object) -> str:
    """dtype and shape of a tensor, else the type's name (for error messages)."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__


@contextlib.contextmanager
def _on_device(device: str) -> Iterator[bool]:
    """Yields torch-fidelity's `cuda` flag; for "cuda:N" makes N the current device, since
    torch-fidelity moves the model and batches with a bare .cuda()."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda[:N]'") from err
    if dev.type == "cpu":
        yield False
    elif dev.type == "cuda":
        with torch.cuda.device(dev.index if dev.index is not None else torch.cuda.current_device()):
            yield True
    else:
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda[:N]'")


# ---------------------------------------------------------------------------------------------
# Weights: a local file, or torch-fidelity's download into torch's hub cache


def inception_weights(weights: Path | None) -> Path:
    """The Inception weights file to load: `weights`, or torch-fidelity's file downloaded into
    torch's hub cache when None; checked to unpickle safely. The flows call it before they
    start, so missing weights fail at once, not after an epoch or a generation.

    Raises:
        EvaluationError: one line saying where to put the file, if it is missing, cannot be
            downloaded, or is not loadable.
    """
    path = _weights_file(weights)
    _checked(path)
    return path


def _weights_file(weights: Path | None) -> Path:
    return _existing(weights) if weights is not None else _downloaded()


def _checked(path: Path) -> bytes:
    """The bytes of the weights file at path, checked to be a dict of tensors with fc.weight:
    torch-fidelity loads them with torch.load(weights_only=False), which would run code
    planted in a file."""
    fix = f"download {INCEPTION_URL} and set {_SETTING} to its path"
    try:
        data = path.read_bytes()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise EvaluationError(
            f"{path}: refused, it holds pickled objects besides tensors and could run code; {fix}"
        ) from err
    except Exception as err:  # RuntimeError, EOFError ...: truncated or not a torch file
        raise EvaluationError(
            f"{path}: not a loadable weights file ({first_line(err)}); {fix}"
        ) from err
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise EvaluationError(f"{path}: not torch-fidelity's Inception weights; {fix}")
    return data


def _existing(weights: Path) -> Path:
    """`weights` as a Path, or EvaluationError when no such file exists."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise EvaluationError(
            f"the Inception weights file {path} does not exist; download {INCEPTION_URL} "
            f"and set {_SETTING} to its path"
        )
    return path


def _downloaded() -> Path:
    """INCEPTION_FILE in torch's hub cache, where torch-fidelity itself would put it, downloaded
    (without a timeout: urllib's default) unless it is there."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, os.fspath(path), progress=False)
    except OSError as err:  # URLError, HTTPError, timeouts and resets are all OSErrors
        reason = getattr(err, "reason", err)
        raise EvaluationError(
            f"the Inception weights could not be downloaded ({_one_line(reason)}); download "
            f"{INCEPTION_URL} on a machine with internet and set {_SETTING} to its path"
        ) from err
    return path


def _weights_id(weights: Path | None) -> str:
    """'default', or the weights file's name, size and sha256 (memoised per version)."""
    if weights is None:
        return "default"
    path = _existing(weights)
    key = _file_key(path)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return f"{path.name}:{key[2]}:{_SHA256[key]}"


def _file_key(path: Path) -> tuple[str, int, int]:
    """(resolved path, mtime_ns, size): changes whenever the file is rewritten."""
    stat = path.stat()
    return (os.fspath(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _one_line(reason: object) -> str:
    """str(reason) with its whitespace and newlines collapsed to single spaces."""
    return " ".join(str(reason).split())
