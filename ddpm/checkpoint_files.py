"""Which checkpoint files a run keeps, and which one it resumes from."""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ddpm.checkpoint import atomic_write, checksum_path, load_checkpoint, save_checkpoint
from ddpm.errors import first_line
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
            log.warning("skipping unusable checkpoint %s: %s", path, first_line(err))
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


def keep_best(run: RunDir, checkpoint: Path, epoch: int, fid: float) -> bool:
    """Make `checkpoint` the run's best.pt if its FID is the lowest so far (best.json holds the
    best FID and epoch); returns whether it did.

    best.pt is a hard link to the epoch checkpoint (no copy; it outlives the epoch file's
    pruning, and checkpoints are never written in place), or a copy where links are not
    possible; either way it replaces the old best.pt atomically, with its checksum beside it.
    """
    record = run.best_record
    if record.is_file() and json.loads(record.read_text())["fid"] <= fid:
        return False
    best, tmp = run.best_checkpoint, run.checkpoints / f".best.pt.{os.getpid()}.link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(checkpoint, tmp)
        os.replace(tmp, best)
    except OSError:
        tmp.unlink(missing_ok=True)
        data = Path(checkpoint).read_bytes()
        atomic_write(best, lambda f: f.write(data))
    digest = checksum_path(checkpoint).read_text().split()[0]
    atomic_write(checksum_path(best), lambda f: f.write(f"{digest}  {best.name}\n".encode()))
    text = json.dumps({"fid": fid, "epoch": epoch, "checkpoint": Path(checkpoint).name}) + "\n"
    atomic_write(record, lambda f: f.write(text.encode()))
    return True
