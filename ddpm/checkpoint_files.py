"""Which checkpoint files a run keeps, and which one it resumes from."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ddpm.checkpoint import checksum_path, load_checkpoint, save_checkpoint
from ddpm.run_dir import RunDir

log = logging.getLogger(__name__)

STEP_CHECKPOINTS_KEPT = 2  # the newest mid-epoch checkpoint and one to fall back on


def _newest_loadable(paths: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path)
        except pickle.UnpicklingError:
            # torch's own message suggests weights_only=False: exactly what not to do here.
            log.warning(
                "skipping unusable checkpoint %s: refused by weights_only loading (it "
                "holds objects other than tensors; never load it unsafely)",
                path,
            )
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("skipping unusable checkpoint %s: %s", path, reason)
    return None


def load_newest_valid(run: RunDir) -> tuple[Path, dict[str, Any]] | None:
    """The run's checkpoint with the most steps that loads and matches its checksum, with its
    state; None if there is none.

    Epoch and mid-epoch checkpoints are compared by global step (an epoch checkpoint wins a
    tie). A checkpoint that fails to load (truncated, bit-flipped, or carrying a pickled
    payload that weights_only refuses) is reported in one warning line and the next older one
    is tried.
    """
    best = _newest_loadable(run.step_checkpoints())
    epoch = _newest_loadable(run.epoch_checkpoints())
    if epoch is not None and (best is None or epoch[1]["global_step"] >= best[1]["global_step"]):
        best = epoch
    return best


def _remove(paths: list[Path]) -> list[Path]:
    for path in paths:
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
    return paths


def prune_checkpoints(run: RunDir, keep: int) -> list[Path]:
    """Delete all but the newest `keep` epoch checkpoints; returns the deleted paths."""
    return _remove(run.epoch_checkpoints()[:-keep] if keep > 0 else [])


def save_epoch_checkpoint(snapshot: Mapping[str, Any], run: RunDir, keep: int) -> Path:
    """Atomically write the snapshot's epoch checkpoint, keep only the newest `keep`, and drop
    the mid-epoch checkpoints it supersedes."""
    path = save_checkpoint(run.epoch_checkpoint(snapshot["epoch"]), snapshot)
    prune_checkpoints(run, keep)
    _remove(run.step_checkpoints())
    return path


def save_step_checkpoint(snapshot: Mapping[str, Any], run: RunDir) -> Path:
    """Atomically write the snapshot's mid-epoch checkpoint and keep the newest two."""
    path = save_checkpoint(run.step_checkpoint(snapshot["global_step"]), snapshot)
    _remove(run.step_checkpoints()[:-STEP_CHECKPOINTS_KEPT])
    return path
