"""The whole training state on disk: atomic writes, safe loads, exact resume."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel

FORMAT_VERSION = 1  # bump when the layout of the state dict changes


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that readers see the old file or the whole new one, never a part.

    The bytes go to a temporary file beside `path`, are flushed and fsynced, and the file is
    renamed over `path` with os.replace; the folder is fsynced so the rename survives a crash.
    On any error the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> Path:
    """Atomically save a state dict (see training_state) to path; returns path."""
    return atomic_write(Path(path), lambda f: torch.save(dict(state), f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with torch.load(weights_only=True): tensors and plain
    containers only, so a file carrying a pickled payload is refused and its code never runs."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


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


def training_state(
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler | None,
    ema: AveragedModel | None,
    *,
    epoch: int,
    global_step: int,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A CPU snapshot of everything needed to resume exactly.

    Args:
        model: the trained module (a DiffusionModel).
        optimizer, scheduler, ema: their states are included (scheduler, ema may be None).
        epoch: epochs completed.
        global_step: optimizer steps taken.
        settings: the resolved settings, as plain JSON-like values.

    Returns:
        a dict of tensors and plain values, safe to hand to another thread and to save.
    """
    return to_cpu(
        {
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch,
            "global_step": global_step,
            "rng": capture_rng_state(),
            "settings": dict(settings or {}),
            "versions": package_versions(),
        }
    )


def restore_training_state(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    ema: AveragedModel | None = None,
    *,
    restore_rng: bool = True,
) -> None:
    """Load a training_state into freshly built objects (on any device) and the RNGs."""
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    if restore_rng:
        restore_rng_state(state["rng"])
