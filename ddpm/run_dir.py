"""A run's place on disk: the one module that knows the run folder's layout.

runs/<run name>/
    settings.json            the resolved settings (also what marks the folder as a run's)
    lock                     held (an OS file lock) by the process training the run
    wandb_id.txt             the W&B run id, so a resumed run continues it
    metrics.jsonl            one line per epoch: loss, lr, images/s, seconds (and FID/KID)
    checkpoints/epoch_001.pt (+ .sha256), step_0000400.pt (mid-epoch), ...
    checkpoints/best.pt (+ .sha256), best.json   the checkpoint with the lowest FID, and its FID
    samples/epoch_001.png    the sample grid after epoch 1, ...

and which of its checkpoint files it keeps, and which one it resumes from. Every file is
written atomically (ddpm.files); one damaged since is recovered from what else the folder holds
where it can be (the settings and the metrics rows from the checkpoints, best.json from the
metrics rows), with a warning, or named in a one-line error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ddpm.checkpoint import checksum_path, load_checkpoint, save_checkpoint, to_cpu
from ddpm.errors import UserError, first_line
from ddpm.files import (
    DamagedFile,
    atomic_write,
    checksum_file,
    claim_folder,
    damaged,
    read_checked,
    read_json,
    write_checked,
    write_checked_json,
)

_EPOCH_CHECKPOINT = re.compile(r"^epoch_(\d+)\.pt$")
_EMA_SNAPSHOT = re.compile(r"^snapshot_(\d+)\.pt$")
_STEP_CHECKPOINT = re.compile(r"^step_(\d+)\.pt$")


class RunInUse(UserError):
    """Another process holds the run folder's lock."""


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's files; creates nothing."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def ema(self) -> Path:
        """ema/: post-hoc EMA's snapshots and the checkpoints ddpm-ema rebuilds from them."""
        return self.path / "ema"

    def ema_snapshot(self, global_step: int) -> Path:
        """ema/snapshot_XXXXXXX.pt: the power-function EMAs after `global_step` steps."""
        return self.ema / f"snapshot_{global_step:07d}.pt"

    def ema_snapshots(self) -> list[Path]:
        """The post-hoc EMA snapshots, oldest first."""
        if not self.ema.is_dir():
            return []
        found = [(int(m[1]), p) for p in self.ema.iterdir() if (m := _EMA_SNAPSHOT.match(p.name))]
        return [p for _, p in sorted(found)]

    @property
    def settings_file(self) -> Path:
        return self.path / "settings.json"

    @property
    def wandb_id_file(self) -> Path:
        return self.path / "wandb_id.txt"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def lock_file(self) -> Path:
        return self.path / "lock"

    @contextlib.contextmanager
    def locked(self, doing: str = "training this run") -> Iterator[None]:
        """Hold the run folder for this process: an exclusive OS lock on its lock file
        (filelock: flock on Unix, msvcrt on Windows), which the OS releases when the process
        ends however it ends, so a crash never leaves a stale lock. The holder writes its PID
        into the file, for the message of the next one, which says what the holder is `doing`.

        Raises:
            RunInUse: at once, naming the folder and the holder's PID, if another process
                holds it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.lock_file, timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            holder = "unknown"
            with contextlib.suppress(OSError, UnicodeDecodeError):
                holder = self.lock_file.read_text().strip() or holder
            raise RunInUse(
                f"{self.path} is in use by process {holder}, which is {doing}; "
                "wait for it to end or stop it (a second process would interleave its "
                "checkpoints)"
            ) from None
        try:
            with contextlib.suppress(OSError):  # only the message of a second process needs it
                fd = os.open(self.lock_file, os.O_WRONLY)
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                finally:
                    os.close(fd)
            yield
        finally:
            lock.release()

    def claim(self) -> None:
        """Check, before anything is written, that the folder is new, empty or a run's (it holds
        settings.json; a start killed before writing it leaves only the lock file).

        Raises:
            NotOurs: naming the folder and files that are not a run's; nothing is changed.
        """
        allowed = ("lock", checksum_file(self.settings_file).name)  # written before settings.json
        claim_folder(self.path, self.settings_file.name, "a run's", allowed, "run.dir / run.name")

    def saved_settings(self) -> dict[str, Any] | None:
        """The settings the run was made with (settings.json); None for a new run.

        A damaged settings.json is recovered from the newest valid checkpoint's settings, with
        a warning (the caller writes it again); without a checkpoint there is nothing it could
        hold that the current settings do not, so it is None, also with a warning.
        """
        fix = "it is written again from the current settings"
        try:
            saved = read_json(self.settings_file, fix)
            if not all(isinstance(v, dict) for v in saved.values()):  # groups of settings
                raise damaged(self.settings_file, "not groups of settings", fix)
            return saved
        except FileNotFoundError:
            return None
        except DamagedFile as err:
            newest = load_newest_valid(self)
            if newest is not None and isinstance(newest[1].get("settings"), dict):
                log.warning("%s; using the settings saved in %s", err, newest[0])
                return newest[1]["settings"]
            log.warning("%s (the run has no checkpoint to recover them from)", err)
            return None

    def metrics_rows(self) -> list[dict[str, Any]]:
        """The per-epoch rows of metrics.jsonl (epoch, loss, lr, images/s, ... and FID/KID),
        oldest first; [] before the first epoch.

        A damaged file (a line that is not a JSON object with an epoch) is recovered with a
        warning: from the newest checkpoint that holds the rows (each epoch checkpoint does)
        plus the good lines after it, else from the good lines alone.
        """
        try:
            text, problem = read_checked(self.metrics_file, ""), ""
        except FileNotFoundError:
            return []
        except DamagedFile as err:
            text, problem = "", str(err).split(" is damaged (", 1)[-1].rsplit("); ", 1)[0]
            with contextlib.suppress(OSError, UnicodeDecodeError):  # its good lines, if any
                text = self.metrics_file.read_bytes().decode()
        rows: list[dict[str, Any]] = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                    raise ValueError("no epoch")
                rows.append(row)
            except ValueError:
                problem = problem or f"line {number} is not a row of metrics"
        if not problem:
            return rows
        newest = load_newest_valid(self)
        saved = newest[1].get("metrics") if newest is not None else None
        if isinstance(saved, list):
            last = max((r["epoch"] for r in saved), default=0)
            rows = [dict(r) for r in saved] + [r for r in rows if r["epoch"] > last]
            source = f"the rows saved in {newest[0]} and the file's good lines"
        else:
            source = "the file's good lines (no checkpoint holds the rows)"
        log.warning("%s is damaged (%s); recovered from %s", self.metrics_file, problem, source)
        return sorted({r["epoch"]: r for r in rows}.values(), key=lambda r: r["epoch"])

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Atomically write metrics.jsonl (one JSON object per epoch), checked."""
        write_checked(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))

    def best(self) -> dict[str, Any] | None:
        """best.json: best.pt's FID (and its other metrics), epoch and checkpoint name; None
        if the run has evaluated nothing. A damaged best.json is recovered from the metrics
        rows (the evaluated epoch with the lowest FID), with a warning."""
        fix = "recovered from the metrics rows"
        try:
            record = read_json(self.best_record, fix)
            if isinstance(record.get("fid"), (int, float)):
                return record
            raise damaged(self.best_record, "no fid in it", fix)
        except FileNotFoundError:
            return None
        except DamagedFile as err:
            log.warning("%s", err)
        scored = [r for r in self.metrics_rows() if isinstance(r.get("fid"), (int, float))]
        if not scored:
            return None
        row = min(scored, key=lambda r: r["fid"])
        metrics = {k: v for k, v in row.items() if k in ("fid", "kid", "kid_std")}
        return {
            **metrics,
            "epoch": row["epoch"],
            "checkpoint": self.epoch_checkpoint(row["epoch"]).name,
        }

    @property
    def best_checkpoint(self) -> Path:
        """checkpoints/best.pt: the evaluated checkpoint with the lowest FID."""
        return self.checkpoints / "best.pt"

    @property
    def best_record(self) -> Path:
        """checkpoints/best.json: best.pt's epoch, FID and other metrics (KID)."""
        return self.checkpoints / "best.json"

    def epoch_checkpoint(self, epoch: int) -> Path:
        """checkpoints/epoch_XXX.pt, epochs numbered from 1."""
        return self.checkpoints / f"epoch_{epoch:03d}.pt"

    def step_checkpoint(self, global_step: int) -> Path:
        """checkpoints/step_XXXXXXX.pt: a mid-epoch checkpoint after `global_step` steps."""
        return self.checkpoints / f"step_{global_step:07d}.pt"

    def grid(self, epoch: int) -> Path:
        """samples/epoch_XXX.png: the sample grid drawn after an epoch."""
        return self.samples / f"epoch_{epoch:03d}.png"

    def epoch_checkpoints(self) -> list[Path]:
        """The epoch checkpoints, oldest epoch first."""
        return self._numbered(_EPOCH_CHECKPOINT)

    def step_checkpoints(self) -> list[Path]:
        """The mid-epoch checkpoints, oldest first."""
        return self._numbered(_STEP_CHECKPOINT)

    def _numbered(self, pattern: re.Pattern[str]) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m[1]), p) for p in self.checkpoints.iterdir() if (m := pattern.match(p.name))]
        return [p for _, p in sorted(found)]


# ---------------------------------------------------------------------------------------------
# The run's checkpoint files

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


def save_ema_snapshot(profiles: Mapping[float, Any], run: RunDir, global_step: int) -> Path:
    """Atomically write the power-function EMAs (ddpm.training.EMA by sigma_rel) as the run's
    post-hoc EMA snapshot after global_step steps: each profile's averaged weights and t, the
    updates it has averaged (steps skipped as non-finite are not among them)."""
    snapshot = {
        "global_step": global_step,
        "profiles": {
            str(s): {"t": int(p.n_averaged), "weights": to_cpu(p.module.state_dict())}
            for s, p in profiles.items()
        },
    }
    return save_checkpoint(run.ema_snapshot(global_step), snapshot)


def save_step_checkpoint(snapshot: Mapping[str, Any], run: RunDir) -> Path:
    """Atomically write the snapshot's mid-epoch checkpoint and keep the newest two."""
    path = save_checkpoint(run.step_checkpoint(snapshot["global_step"]), snapshot)
    _remove(run.step_checkpoints()[:-STEP_CHECKPOINTS_KEPT])
    return path


def keep_best(run: RunDir, checkpoint: Path, epoch: int, metrics: Mapping[str, float]) -> bool:
    """Make `checkpoint` the run's best.pt if its FID (metrics["fid"]) is the lowest so far
    (best.json holds its FID, its other metrics and its epoch); returns whether it did.

    best.pt is a hard link to the epoch checkpoint (no copy; it outlives the epoch file's
    pruning, and checkpoints are never written in place), or a copy where links are not
    possible; either way it replaces the old best.pt atomically, with its checksum beside it.
    """
    record, fid = run.best_record, float(metrics["fid"])
    saved = run.best()
    if saved is not None and saved["fid"] <= fid and run.best_checkpoint.is_file():
        return False
    best, tmp = run.best_checkpoint, run.checkpoints / f".best.pt.{os.getpid()}.{id(run)}.link"
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
    values = {k: float(v) for k, v in metrics.items()}
    write_checked_json(record, {**values, "epoch": epoch, "checkpoint": Path(checkpoint).name})
    return True
