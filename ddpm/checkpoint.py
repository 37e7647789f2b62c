"""Training state on disk: atomic writes, checksummed and safe loads, format and RNG checks.

What a state holds (model, optimizer, schedule, EMA, counters, RNGs) is written by
training.TrainingState.snapshot and read back by TrainingState.restore.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm.errors import UserError
from ddpm.files import WriteError, atomic_write

# Bump when the layout of the state dict changes. 2: the sinusoidal timestep embedding, the
# posterior-mean buffers, and the lr schedule's settings saved with the scheduler.
FORMAT_VERSION = 2
CHECKSUM_SUFFIX = ".sha256"
_SAVING = threading.Lock()


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: corrupt, or from an incompatible version or model."""


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> Path:
    """Atomically save a state dict (see training_state) to path, with its SHA-256 beside it.

    The checksum file (path + '.sha256') is written first, so a complete checkpoint always has
    one; a crash in between leaves only an orphan checksum. Returns path.

    Raises:
        CheckpointError: naming the file, if it cannot be written (disk full, permissions);
            existing checkpoints are left as they were.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    data = buffer.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    try:
        # Two threads may save the same file (the API watcher's save and the checkpoint
        # task): one pair of checksum and file at a time, so the two always match.
        with _SAVING:
            atomic_write(
                checksum_path(path), lambda f: f.write(f"{digest}  {path.name}\n".encode())
            )
            return atomic_write(path, lambda f: f.write(data))
    except (OSError, WriteError) as err:
        cause = err.cause if isinstance(err, WriteError) else err
        raise CheckpointError(
            f"could not write checkpoint {path}: {cause.strerror or cause}; "
            "the previous checkpoints are untouched"
        ) from err


def checksum_path(path: Path) -> Path:
    """Where a checkpoint's SHA-256 is kept: beside it, with '.sha256' appended."""
    return Path(path).with_name(Path(path).name + CHECKSUM_SUFFIX)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, verified against the SHA-256 beside it (if any).

    torch.load(weights_only=True) accepts tensors and plain containers only, so a file carrying
    a pickled payload is refused and its code never runs.

    Raises:
        CheckpointError: if the checksum does not match (truncated or bit-flipped file).
        Exception: whatever torch.load raises for an unreadable or refused file.
    """
    path = Path(path)
    data = path.read_bytes()
    recorded = checksum_path(path)
    if recorded.is_file():
        expected = (recorded.read_bytes().decode(errors="replace").split() or [""])[0]
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise CheckpointError(f"{path}: SHA-256 {actual[:12]}... does not match {recorded}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, off the training loop.

    submit() hands over a CPU snapshot and returns at once; wait() blocks until the write in
    flight has finished and re-raises its error, so a failed write fails loudly at the next
    wait (the previous checkpoints are untouched: writes are atomic).
    """

    def __init__(self) -> None:
        # Only the training thread calls submit and wait; the pool's thread only runs writes.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future | None = None

    def submit(self, write: Callable[[], Any]) -> None:
        """Wait for the previous write, then start `write()` in the background."""
        self.wait()
        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def check_compatible(
    state: Mapping[str, Any], model: nn.Module, source: str, arch: str | None = None
) -> None:
    """Refuse a checkpoint from another state format, of another network (model.arch) or of
    another model shape, with a message naming both sides instead of load_state_dict's
    shape-mismatch traceback.

    Args:
        arch: the network the current settings build; checked against the checkpoint's
            architecture record (checkpoints without one hold the assignment's).

    Raises:
        CheckpointError: naming the checkpoint (source) and what differs.
    """
    versions = state.get("versions") or {}
    if versions.get("format") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{source} was written by checkpoint format {versions.get('format')!r} "
            f"(ddpm-pipeline {versions.get('ddpm-pipeline', '?')}); this version reads format "
            f"{FORMAT_VERSION!r} (ddpm-pipeline {package_versions()['ddpm-pipeline']})"
        )
    record = (state.get("architecture") or {}).get("model") or {}
    theirs_arch = record.get("arch", "assignment")
    if arch is not None and theirs_arch != arch:
        raise CheckpointError(
            f"{source} holds the {theirs_arch!r} network; the current settings build the "
            f"{arch!r} one (model.arch): resume with model.arch={theirs_arch} or start a new run"
        )
    _check_diffusion(state, model, source)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state["model"].items()}
    if ours != theirs:
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        key = differ[0]
        raise CheckpointError(
            f"{source} holds a different model: {key} is {theirs.get(key)} there but "
            f"{ours.get(key)} in the model built from the current settings "
            f"({len(differ)} tensors differ; was model.hidden_size, model.channels or another "
            "model.* setting changed?)"
        )


def _check_diffusion(state: Mapping[str, Any], model: nn.Module, source: str) -> None:
    """Refuse weights trained for another formulation, schedule, prediction target or T (or, for
    edm, sigma_data): they would load, and sample noise. The diffusion is read where
    ddpm.generate.architecture reads it (the architecture record, else the settings saved with
    older checkpoints); keys a record lacks predate the choice (LEGACY_DIFFUSION); sigma_data
    is the checkpoint's own buffer."""
    from ddpm.config import LEGACY_DIFFUSION

    if not hasattr(model, "prediction"):  # not a DiffusionModel
        return
    saved = (state.get("architecture") or {}).get("diffusion") or (
        (state.get("settings") or {}).get("diffusion") or {}
    )
    record = {**LEGACY_DIFFUSION, **saved}
    formulation = getattr(model, "formulation", "discrete")
    keys = ["formulation"]
    if record["formulation"] == formulation == "edm":
        saved_sigma = (state.get("model") or {}).get("sigma_data")
        record["sigma_data"] = None if saved_sigma is None else round(float(saved_sigma), 6)
        keys.append("sigma_data")
    elif formulation == "discrete":
        keys += ["schedule", "prediction", "num_timesteps"]
        if model.schedule == "linear":
            keys += ["beta_start", "beta_end"]
    ours = {
        "formulation": formulation,
        "sigma_data": round(float(model.sigma_data), 6) if formulation == "edm" else None,
        "schedule": model.schedule,
        "prediction": model.prediction,
        "num_timesteps": model.num_timesteps,
        "beta_start": model.betas_range[0],
        "beta_end": model.betas_range[1],
    }
    for key in keys:
        if key in record and record[key] != ours[key]:
            raise CheckpointError(
                f"{source} was trained with diffusion.{key}={record[key]!r}; the current "
                f"settings have {ours[key]!r}: set diffusion.{key}={record[key]} to resume it, or "
                "start a new run"
            )


def to_cpu(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor cloned onto the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's and torch's generators (CPU and every visible CUDA device)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what capture_rng_state returned (CUDA states only where devices match)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def package_versions() -> dict[str, str]:
    """Versions that wrote a checkpoint: the state format, this package and torch."""
    try:
        ours = metadata.version("ddpm-pipeline")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        ours = "unknown"
    return {"format": str(FORMAT_VERSION), "ddpm-pipeline": ours, "torch": str(torch.__version__)}
