"""Faults by the hundred (issue 34): seeded faults injected into the real commands.

    python benchmarks/faults.py --injections N [--seed S] [--kinds k1,k2] [--out PATH]
    python benchmarks/faults.py --only KIND:SEED [--keep]      # one injection again

(also --trials, --stall, --outage: a sweep's size and the harness's patience; --no-mount: the
fallbacks below even as root; tests/benchmarks/test_faults.py imports inject and laboratory.)

Every injection runs the real command (`python flows/train_flow.py`, `flows/sample_flow.py`,
`flows/export_flow.py`, `ddpm-sweep`) against a real `prefect server start`, and the sweeps on
a real `prefect worker start --pool ddpm-local` with the deployments of deployments/prefect.yaml
deployed by `prefect deploy`. It strikes the command with one fault at a seeded point, re-runs
the same command, and records what a user would see: whether the re-run finished, the steps
lost (the last step done before the fault minus the step the re-run resumed from, against
`run.checkpoint_every`), files left damaged, tracebacks printed, whether the final weights
equal those of the same run never interrupted (every run here is a deterministic CPU run,
`train.deterministic true`), and user files gone. Nothing is mocked.

Kinds (`--kinds`): kill-trainer (SIGKILL of the training process, a seeded share of them while
a checkpoint is being written), kill-rank (SIGKILL of rank 1 of a `train.devices 2` run),
kill-worker (SIGKILL of a sweep worker's process group, half of them with the trial's own
process, which runs in a session of its own: the worker's host lost), kill-server-run and
kill-server-sweep (SIGKILL of the Prefect server's group during a run or a sweep; restarted
on its database and port after a seeded outage), disk-full (during a checkpoint, a sample
folder, an .npz, an export or sweep.json, in turn), read-only (the runs folder made read-only
mid-run), corrupt-checkpoint (the newest checkpoint truncated, bit-flipped, emptied, replaced by
a PNG or by a pickled payload between two runs).

Each record lists what missed the product's promises (`misses`): 0 damaged files, 0 tracebacks,
every run finishing on re-run, at most one checkpoint interval of steps lost, the final weights
of a run never interrupted, no user file deleted, no command hanging. The JSON (--out) holds
every record and a summary per kind; the markdown table is printed at the end and written
beside the JSON (.md). A record's `seed` replays it: `--only KIND:SEED`. A batch stopped part-way
(a 300-injection batch takes hours) goes on where it stopped when the same command runs again
at the same commit: each record is appended to a journal beside the JSON (.journal.jsonl) as
it ends, and the JSON counts the sittings.

Linux only (/proc). As root with CAP_SYS_ADMIN the disk fills on a small tmpfs and a folder turns
read-only through a read-only bind mount over it; otherwise the fallbacks run: RLIMIT_FSIZE set
on the running process (CPython ignores SIGXFSZ, so its writes fail with EFBIG) and chmod.
Each record names the path it took (`method`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flows.children import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtual environment's commands
KINDS = (
    "kill-trainer", "kill-rank", "kill-worker", "kill-server-run", "kill-server-sweep",
    "disk-full", "read-only", "corrupt-checkpoint",
)  # fmt: skip
DISK_TARGETS = ("checkpoint", "samples", "npz", "export", "sweep.json")
CORRUPTIONS = ("truncate", "bit-flip", "empty", "png", "pickle-payload")

# The tiny deterministic CPU run every training fault strikes: 64 images in batches of 8 (8 steps
# per epoch), 3 epochs (24 steps of about 0.1 s here), a mid-epoch checkpoint every 3 steps.
EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 3, 8, 3
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
TRAIN = {
    "data.subset": 64, "model.hidden_size": 16, "diffusion.num_timesteps": 50,
    "train.epochs": EPOCHS, "train.batch_size": 8, "train.device": "cpu", "train.log_every": 1,
    "train.deterministic": "true", "run.checkpoint_every": CHECKPOINT_EVERY,
    "sample.num": 4, "sample.steps": 5, "wandb.mode": "disabled",
}  # fmt: skip
# A sweep's trials run on the ddpm-smoke deployment (its job variables set the rest), one at a
# time, so that a worker's output is one trial's.
SWEEP_EPOCHS = 2
TRIAL_STEPS = SWEEP_EPOCHS * STEPS_PER_EPOCH
SWEEP_BASE = {
    "data.subset": 64, "train.batch_size": 8, "train.epochs": SWEEP_EPOCHS,
    "model.hidden_size": 16, "diffusion.num_timesteps": 50, "train.deterministic": True,
    "run.checkpoint_every": CHECKPOINT_EVERY, "sample.num": 4, "sample.steps": 5,
    "wandb.mode": "disabled",
}  # fmt: skip
SWEEP_LRS = [1e-3, 5e-4]  # optim.lr of trial-000, trial-001
SAMPLES, SAMPLE_BATCH = 24, 8  # `sample_flow.py --num 24 --batch-size 8 --npz`: 3 batches

WRITE_SHARE = 0.4  # of kill-trainer injections aimed at a checkpoint write in progress
COMMAND_TIMEOUT = 300.0  # seconds a command may run before it counts as hung
PAGE = 4096  # tmpfs allocates whole pages

TRACEBACK = "Traceback (most recent call last)"
STEP_LINE = re.compile(r"step (\d+)  loss")
RESUMED = re.compile(r"resumed after step (\d+)")
ALREADY_DONE = re.compile(r"already finished (\d+) of (\d+) epochs")
# atomic_write's temp file of a checkpoint (not of its .sha256): .step_0000003.pt.<random>.tmp
CHECKPOINT_TMP = re.compile(r"^\.(?:step|epoch)_\d+\.pt\.(?!sha256\.)[^.]+\.tmp$")
ONE_LINE = ("error: ", "stopped: ")


# ---- processes ----------------------------------------------------------------------------------


class Command:
    """One real command in a session of its own; its output (stdout and stderr together) is
    kept line by line as it comes, with the training steps it reports, and copied to `log`."""

    def __init__(self, argv: Sequence[Any], env: dict[str, str], cwd: Path, log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.argv = [str(a) for a in argv]
        self._log = open(log, "w")  # noqa: SIM115 - closed by the reader at the end of output
        self.process = subprocess.Popen(
            self.argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
        self.pid = self.process.pid
        self.lines: list[str] = []
        self.steps: list[int] = []  # every "step N  loss" line's N, in order
        self.changed = time.monotonic()  # when output last came
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._seen:
                self.lines.append(line)
                self._log.write(line)
                if m := STEP_LINE.search(line):
                    self.steps.append(int(m[1]))
                self.changed = time.monotonic()
                self._seen.notify_all()
        self._log.close()
        with self._seen:
            self._seen.notify_all()

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_until(self, seen: Callable[[], bool], timeout: float = COMMAND_TIMEOUT) -> bool:
        """Wait until seen() holds (re-checked at each output line); False if the command
        ended or the time ran out first."""
        with self._seen:
            self._seen.wait_for(lambda: seen() or not self.alive(), timeout)
            return seen()

    def wait_for_step(self, step: int, timeout: float = COMMAND_TIMEOUT) -> bool:
        return self.wait_until(lambda: self.last_step >= step, timeout)

    def finish(self, timeout: float = COMMAND_TIMEOUT) -> int | None:
        """The exit status once the command ends; None if it is still running after timeout
        (it is left running)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(timeout=10)
        return code

    @property
    def last_step(self) -> int:
        return max(self.steps, default=0)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def last_line(self) -> str:
        return next((line.strip() for line in reversed(self.lines) if line.strip()), "")

    def kill(self) -> None:
        """SIGKILL it and everything below it, while it runs (once it has been reaped, its pid
        may belong to another process)."""
        if self.alive():
            kill_tree(self.pid)


def children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from /proc/PID/stat."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)" and state
            found.setdefault(parent, []).append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    """The processes below pid (the launcher's ranks and Prefect's flow-run processes run in
    sessions of their own, so a process group does not hold them)."""
    tree, found, todo = children_by_parent(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def environ(pid: int) -> dict[str, str]:
    """A process's environment, from /proc/PID/environ (empty once it is gone)."""
    with contextlib.suppress(OSError):
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        return dict(v.split("=", 1) for v in raw.decode(errors="replace").split("\0") if "=" in v)
    return {}


def started(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat), to tell it from a later one that
    reuses its pid; None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def running(pid: int) -> bool:
    """Whether pid is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(pid: int) -> None:
    """SIGKILL a running process started here, its process group and every process below
    it."""
    victims = [pid, *descendants(pid)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


# ---- files --------------------------------------------------------------------------------------


def damage(path: Path) -> str | None:
    """Why a file the product wrote is unusable, or None: a checkpoint must match its .sha256
    and load with torch.load(weights_only=True); JSON and JSON-lines files parse; PNGs open;
    .npz and .safetensors files load."""
    import torch

    suffix = path.suffix
    try:
        if suffix == ".pt":
            data = path.read_bytes()
            recorded = path.with_name(path.name + ".sha256")
            if not recorded.is_file():
                return "no .sha256 beside it"
            if hashlib.sha256(data).hexdigest() != (recorded.read_text().split() or [""])[0]:
                return "does not match its .sha256"
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        elif suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".jsonl":
            for line in path.read_text().splitlines():
                if line.strip():
                    json.loads(line)
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                image.load()
        elif suffix == ".npz":
            with np.load(path) as npz:
                npz["arr_0"]
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))
    except Exception as err:  # any failure to read is the finding
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def is_temporary(path: Path, root: Path) -> bool:
    """A temporary file of an atomic write or a staging folder (`.NAME.partial`), not a
    product file: reported as left behind, not as damaged."""
    parts = path.relative_to(root).parts
    return path.name.endswith(".tmp") or any(p.endswith(".partial") for p in parts)


def damaged_files(root: Path, skip: set[Path], when: str) -> dict[str, str]:
    """Each file under root that is damaged (see `damage`), as "when: path" with why; `skip`:
    the ones the harness damaged itself. A file that fails is read again half a second later
    (a trial that outlived its worker may be appending to it)."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p not in skip):
        if not is_temporary(path, root) and damage(path):
            time.sleep(0.5)
            if path.is_file() and (why := damage(path)):
                found[f"{when}: {path.relative_to(root)}"] = why
    return found


def temporary_files(root: Path) -> list[str]:
    """The temporaries (see is_temporary) under root, as paths relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and is_temporary(p, root))  # fmt: skip


def digest(path: Path) -> str:
    """A file's SHA-256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_digests(root: Path) -> dict[str, str]:
    """Every file under root by its relative path, with its SHA-256."""
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's state, read as the product reads it (weights_only=True)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold equal "model" and "ema" tensors (torch.equal)."""
    import torch

    one, two = load(a), load(b)
    for part in ("model", "ema"):
        x, y = one[part], two[part]
        if x.keys() != y.keys():
            return False
        for name, value in x.items():
            if isinstance(value, torch.Tensor):
                if not (isinstance(y[name], torch.Tensor) and torch.equal(value, y[name])):
                    return False
            elif value != y[name]:
                return False
    return True


def checkpoints(run: Path) -> list[tuple[int, bool, Path]]:
    """The run's usable checkpoints as (global step, is an epoch checkpoint, path), in the
    order the product prefers them: most steps first, an epoch checkpoint before a mid-epoch
    one of the same step."""
    found = []
    for path in (run / "checkpoints").glob("*.pt"):
        if path.name != "best.pt" and damage(path) is None:
            found.append((load(path)["global_step"], path.name.startswith("epoch_"), path))
    return sorted(found, reverse=True)


def run_folder(runs: Path) -> Path | None:
    """The one run folder under a run.dir (its name is the product's hash of the settings)."""
    found = [p for p in runs.iterdir() if p.is_dir()] if runs.is_dir() else []
    return found[0] if len(found) == 1 else None


def write_cifar10(root: Path, images_per_batch: int = 16) -> Path:
    """CIFAR-10 in the official python format under root/cifar-10-batches-py (pickled dicts
    with bytes keys, a uint8 (N, 3072) `data` array), so that nothing downloads."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, images_per_batch).tolist(),
            b"data": rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(images_per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [b"airplane"] * 10, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


class _Payload:
    """Unpickling it would run a shell command: a hostile checkpoint's content."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def corrupt(path: Path, how: str, rng: random.Random, marker: Path) -> str:
    """Damage a checkpoint in place (its .sha256 untouched, as a failing disk leaves it);
    returns what was done."""
    import torch

    data = path.read_bytes()
    if how == "truncate":
        cut = rng.randrange(len(data))
        path.write_bytes(data[:cut])
        return f"truncated at byte {cut} of {len(data)}"
    if how == "bit-flip":
        bit = rng.randrange(len(data) * 8)
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        return f"bit {bit} flipped"
    if how == "empty":
        path.write_bytes(b"")
        return "emptied"
    if how == "png":
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="png")
        path.write_bytes(buffer.getvalue())
        return "replaced by a PNG image"
    torch.save({"model": _Payload(f"touch {marker}")}, path)
    return f"replaced by a pickled payload that would create {marker.name}"


# ---- disks --------------------------------------------------------------------------------------


def can_mount(scratch: Path) -> bool:
    """Whether this process may mount (root with CAP_SYS_ADMIN): tried on a 4 KiB tmpfs."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(tempfile.mkdtemp(dir=scratch))
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(probe)],
                              capture_output=True).returncode == 0  # fmt: skip
        if done:
            subprocess.run(["umount", str(probe)], check=True)
        return done
    finally:
        probe.rmdir()


def chmod_stops_writes(scratch: Path) -> bool:
    """Whether a folder without write permission refuses this process (it does not refuse
    root, or any process with CAP_DAC_OVERRIDE): tried on a scratch folder."""
    probe = Path(tempfile.mkdtemp(dir=scratch))
    probe.chmod(0o555)
    try:
        (probe / "x").write_text("")
    except PermissionError:
        return True
    else:
        (probe / "x").unlink()
        return False
    finally:
        probe.chmod(0o755)
        probe.rmdir()


class Mounts:
    """The mounts this harness made, undone in reverse order at release (lazily when busy)."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def mount(self, *args: str) -> None:
        subprocess.run(["mount", *args], check=True, capture_output=True)
        self.made.append(Path(args[-1]))

    def tmpfs(self, folder: Path, size: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        self.mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
        return folder

    def read_only(self, folder: Path) -> None:
        """New opens under folder fail with EROFS: a bind mount of it over itself, remounted
        read-only. (A plain `remount,ro` of the folder's own filesystem is refused with EBUSY
        while the run holds its lock file open for writing; files already open stay
        writable, as they would on a filesystem the kernel turns read-only.)"""
        self.mount("--bind", str(folder), str(folder))
        for _ in range(2000):  # EBUSY while a file opened through the new mount is written
            remount = ["mount", "-o", "remount,bind,ro", str(folder)]
            if subprocess.run(remount, capture_output=True).returncode == 0:
                return
            time.sleep(0.001)
        raise RuntimeError(f"{folder} could not be made read-only (busy)")

    def release(self, folder: Path | None = None) -> None:
        """Unmount folder's newest mount (every mount when None)."""
        for mounted in reversed(list(self.made)):
            if folder is None or mounted == folder:
                done = subprocess.run(["umount", str(mounted)], capture_output=True)
                if done.returncode != 0:
                    subprocess.run(["umount", "-l", str(mounted)], capture_output=True)
                self.made.remove(mounted)
                if folder is not None:
                    return


def free_bytes(folder: Path) -> int:
    """The bytes an unprivileged process may still write on folder's filesystem."""
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def fill(folder: Path, leave: int) -> Path:
    """A filler file on folder's filesystem leaving about `leave` bytes free. The run under
    test may be writing meanwhile, so the free space read can be gone by the time it is taken:
    then it is read again and the filler grown to it (three of the first 300 injections of
    disk-full at a checkpoint failed in the harness on that race)."""
    filler = folder / ".faults-filler"
    with open(filler, "wb") as f:
        for _ in range(100):
            size = os.fstat(f.fileno()).st_size + max(0, free_bytes(folder) - leave)
            try:
                os.posix_fallocate(f.fileno(), 0, max(size, 1))
                return filler
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
    raise OSError(errno.ENOSPC, f"{folder}: the free space kept shrinking while it was filled")


def limit_file_size(pid: int, limit: int) -> None:
    """RLIMIT_FSIZE on a running process: its writes past `limit` bytes fail with EFBIG."""
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, limit))


def pages(paths: Sequence[Path]) -> int:
    """The tmpfs pages the files take."""
    return sum(-(-p.stat().st_size // PAGE) for p in paths)


@dataclasses.dataclass(frozen=True)
class Options:
    """How a batch runs: a sweep's size, the harness's patience, and whether it may mount (the
    benchmark's defaults, or the tests' quicker ones)."""

    trials: int = 2  # a sweep's trials (optim.lr from SWEEP_LRS), one at a time
    # Seconds without output from a sweep or any worker that count as a hang: more than the
    # 90 s a sweep waits for a silent trial's heartbeat before it marks it Crashed.
    stall: float = 150.0
    outage: float = 60.0  # a killed server stays down a seeded 5 s to this (or till it ends)
    second_rerun: bool = True  # after a re-run that hung, one more (as a user would), noted
    mount: bool = True  # tmpfs and bind mounts where allowed; False: the fallbacks, as non-root


# ---- one injection's record ---------------------------------------------------------------------


@dataclasses.dataclass
class Injection:
    """What one fault did and what the re-run showed."""

    kind: str
    seed: int
    target: str = ""  # disk-full: what was being written (DISK_TARGETS)
    fault: str = ""  # what was done, e.g. "SIGKILL of the training process (pid 123)"
    where: str = ""  # where it struck: the step, the phase, the file being written
    method: str = ""  # how the fault was made (tmpfs, bind mount, RLIMIT_FSIZE, chmod, ...)
    first_exit: int | None = None  # the struck command's exit status (-9: SIGKILL)
    first_last_line: str = ""
    rerun_exit: int | None = None
    rerun_last_line: str = ""
    finished: bool = False  # the command, re-run where needed, ended 0 with its work complete
    last_step: int | None = None  # the last step done before the fault
    newest_on_disk: int | None = None  # the newest usable checkpoint's step after the fault
    resumed_from: int | None = None  # the step the re-run resumed after (0: from the start)
    steps_lost: int | None = None
    lost_bound: int | None = None  # the most steps the product promises to lose here
    damaged: dict[str, str] = dataclasses.field(default_factory=dict)
    temporary_left: list[str] = dataclasses.field(default_factory=list)
    tracebacks: int = 0
    identical: bool | None = None  # to the uninterrupted run (None: not compared)
    user_files_deleted: list[str] = dataclasses.field(default_factory=list)
    hung: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    misses: list[str] = dataclasses.field(default_factory=list)
    harness_error: str | None = None
    seconds: float = 0.0


def misses(rec: Injection) -> list[str]:
    """The product's promises this injection saw broken."""
    found = []
    if not rec.finished:
        found.append("did not finish on re-run")
    if rec.damaged:
        found.append(f"{len(rec.damaged)} damaged file(s)")
    if rec.tracebacks:
        found.append(f"{rec.tracebacks} traceback(s) printed")
    if over_bound(rec):
        found.append(f"lost {rec.steps_lost} steps (bound {rec.lost_bound})")
    if rec.identical is False:
        found.append("final weights or files differ from the uninterrupted run")
    if rec.user_files_deleted:
        found.append(f"{len(rec.user_files_deleted)} user file(s) deleted or changed")
    if rec.hung:
        found.append("hung: " + "; ".join(rec.hung))
    return found + [n for n in rec.notes if n.startswith("miss: ")]


def over_bound(rec: Injection) -> bool:
    """Whether the injection lost more steps than the product promises."""
    return None not in (rec.steps_lost, rec.lost_bound) and rec.steps_lost > rec.lost_bound


def tracebacks(*commands: Command | None) -> int:
    """The tracebacks the commands printed."""
    return sum(c.output.count(TRACEBACK) for c in commands if c is not None)


def one_line_check(rec: Injection, command: Command, code: int | None) -> None:
    """A command that ended by itself with an error must end with one line (error:/stopped:)."""
    if code not in (None, 0) and code > 0 and not command.last_line().startswith(ONE_LINE):
        rec.notes.append(f"miss: exit {code} without a one-line error (last line: "
                         f"{command.last_line()[:160]!r})")  # fmt: skip


def user_error_check(rec: Injection, command: Command, code: int | None) -> None:
    """A full disk or a read-only folder is an error the user fixes: exit 2 and one line that
    names the file or folder (README, Failure and recovery)."""
    line = command.last_line()
    if code is not None and code > 0 and (code != 2 or "/" not in line):
        rec.notes.append(f"miss: exit {code} with {line[:120]!r}: an error the user fixes ends "
                         "with exit 2 and a line naming the file")  # fmt: skip


def resumed_step(output: str) -> int:
    """The step a command resumed after: its "resumed after step N" line, the whole run for
    "already finished", else 0 (it started from scratch)."""
    if m := RESUMED.search(output):
        return int(m[1])
    if ALREADY_DONE.search(output):
        return TOTAL_STEPS
    return 0


# ---- the lab: what the injections of one batch share --------------------------------------------


class Lab:
    """A batch's shared things: a scratch folder, the tiny data, the commands' environment, one
    Prefect server (restarted by the server kinds, on the same database and port), the
    ddpm-local pool and a worker once a sweep needs them, and the uninterrupted reference
    results, each made once; every process it starts and every mount it makes end with it."""

    def __init__(self, root: Path, options: Options) -> None:
        self.root, self.options = root, options
        self.data = root / "data"
        write_cifar10(self.data)
        self.mounting = options.mount and can_mount(root)
        self.chmod_works = chmod_stops_writes(root)
        self.mounts = Mounts()
        self.commands: list[Command] = []
        self.strays: list[tuple[int, str]] = []  # (pid, start time): survivors of a killed parent
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DDPM_"))}
        self.env.update(
            PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_API_URL=self.api, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
            PREFECT_WORKER_QUERY_SECONDS="2",  # workers look for runs every 2 s (default 10)
        )  # fmt: skip
        self.server: Command | None = None
        self.server_starts = 0
        self.worker: Command | None = None
        self.workers_started = 0
        self.deployed = False
        self.references: dict[str, Any] = {}

    def start(self, argv: Sequence[Any], cwd: Path, name: str) -> Command:
        command = Command(argv, self.env, cwd, self.root / "logs" / f"{name}.log")
        self.commands.append(command)
        return command

    def workers(self) -> list[Command]:
        """Every worker started, the dead ones too (their output stays)."""
        return [c for c in self.commands if c.argv[1:3] == ["worker", "start"]]

    def remember_strays(self, pid: int) -> None:
        """Note the processes below pid, which outlive it when it is killed alone."""
        for child in descendants(pid):
            if (when := started(child)) is not None:
                self.strays.append((child, when))

    def close(self) -> None:
        for command in self.commands:
            command.kill()
        for pid, when in self.strays:
            if started(pid) == when:  # still the process this harness started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.mounts.release()

    # -- the Prefect server, the pool and a worker

    def start_server(self) -> None:
        """`prefect server start` on this batch's port and database (PREFECT_HOME's SQLite),
        once /api/health answers."""
        self.server_starts += 1
        self.server = self.start(
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", self.port],
            self.root, f"server-{self.server_starts}",
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while not self.server_answers():
            if not self.server.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start:\n{self.server.output}")
            time.sleep(0.5)

    def server_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api}/health", timeout=2):
                return True
        except OSError:
            return False

    def kill_server(self) -> None:
        """SIGKILL the server's process group (and anything below it)."""
        self.server.kill()
        self.server.finish(timeout=30)

    def prefect(self, *args: str) -> str:
        done = subprocess.run([BIN / "prefect", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)}:\n{done.stdout}{done.stderr}")
        return done.stdout

    def ensure_worker(self) -> Command:
        """The ddpm-local pool and the deployments (once), and a live worker."""
        if not self.deployed:
            self.prefect("work-pool", "create", "ddpm-local", "--type", "process")
            self.prefect("--no-prompt", "deploy", "--all", "--prefect-file",
                         "deployments/prefect.yaml")  # fmt: skip
            self.deployed = True
        if self.worker is None or not self.worker.alive():
            self.workers_started += 1
            name = f"worker-{self.workers_started}"
            self.worker = self.start(
                [BIN / "prefect", "worker", "start", "--pool", "ddpm-local", "--name", name],
                REPO, name,  # a process worker runs flows where `prefect deploy` ran
            )  # fmt: skip
        return self.worker

    # -- commands

    def workspace(self, rec: Injection) -> Path:
        """A fresh folder for one injection, with its own copy of the data and a user's file
        (notes.txt) that nothing may delete."""
        work = self.root / "work" / f"{rec.kind}-{rec.seed}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        shutil.copytree(self.data, work / "data")
        (work / "notes.txt").write_text("a user's notes beside the runs\n")
        return work

    def train_argv(self, work: Path, **changes: Any) -> list[Any]:
        flags = {**TRAIN, "data.root": work / "data", "run.dir": work / "runs", **changes}
        return [sys.executable, REPO / "flows" / "train_flow.py",
                *(x for k, v in flags.items() for x in (f"--{k}", v))]  # fmt: skip

    def reference(self, name: str) -> Any:
        """An uninterrupted result, made once per batch: "train" and "train-2" (the final
        checkpoint of the tiny run on 1 and 2 processes), "samples", "export" (their folders)
        and "sweep" (each trial's final checkpoint)."""
        if name not in self.references:
            self.references[name] = getattr(self, f"_reference_{name.replace('-', '_')}")()
        return self.references[name]

    def _reference_train(self, **changes: Any) -> Path:
        work = self.root / "references" / f"train{len(changes)}"
        shutil.copytree(self.data, work / "data")
        command = self.start(self.train_argv(work, **changes), work, work.name)
        if command.finish() != 0:
            raise RuntimeError(f"the reference run failed:\n{command.output[-3000:]}")
        return run_folder(work / "runs") / "checkpoints" / f"epoch_{EPOCHS:03d}.pt"

    def _reference_train_2(self) -> Path:
        return self._reference_train(**{"train.devices": 2})

    def sample_argv(self, out: Path) -> list[Any]:
        source = self.reference("train").parents[1]
        return [sys.executable, REPO / "flows" / "sample_flow.py", "--run", source, "--num",
                SAMPLES, "--batch-size", SAMPLE_BATCH, "--npz", "--out", out]  # fmt: skip

    def export_argv(self, out: Path) -> list[Any]:
        source = self.reference("train").parents[1]
        return [sys.executable, REPO / "flows" / "export_flow.py", "--run", source, "--out", out]

    def _reference_samples(self) -> Path:
        out = self.root / "references" / "samples"
        if self.start(self.sample_argv(out), self.root, "reference-samples").finish() != 0:
            raise RuntimeError("the reference sample command failed")
        return out

    def _reference_export(self) -> Path:
        out = self.root / "references" / "export"
        if self.start(self.export_argv(out), self.root, "reference-export").finish() != 0:
            raise RuntimeError("the reference export failed")
        return out

    def _reference_sweep(self) -> dict[str, Path]:
        self.ensure_worker()
        work = self.root / "references" / "sweep"
        shutil.copytree(self.data, work / "data")
        spec = write_spec(work, "reference", self.options.trials)
        if self.start([BIN / "ddpm-sweep", "--spec", spec], work, "reference-sweep").finish() != 0:
            raise RuntimeError("the reference sweep failed")
        return trial_checkpoints(work, "reference")


def write_spec(work: Path, name: str, trials: int) -> Path:
    """A grid sweep of `trials` tiny deterministic trials, one at a time, in work/runs."""
    import yaml

    spec = {"name": name, "deployment": "train-flow/ddpm-smoke", "search": "grid",
            "concurrency": 1, "vary": {"optim.lr": SWEEP_LRS[:trials]},
            "base": {**SWEEP_BASE, "data.root": str(work / "data"),
                     "run.dir": str(work / "runs")}}  # fmt: skip
    path = work / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trial_checkpoints(work: Path, name: str) -> dict[str, Path]:
    """Each trial's final epoch checkpoint (trial-NNN: path) in a sweep's folder."""
    folder = work / "runs" / "sweeps" / name
    return {p.parent.parent.name: p for p in sorted(folder.glob("trial-*/checkpoints/epoch_*.pt"))
            if p.name == f"epoch_{SWEEP_EPOCHS:03d}.pt"}  # fmt: skip


# ---- training faults ----------------------------------------------------------------------------


def await_struck(command: Command, rec: Injection, timeout: float = COMMAND_TIMEOUT) -> int | None:
    """Wait for the struck command and record how it ended; one still running after timeout is
    recorded as hung and killed."""
    code = command.finish(timeout)
    if code is None:
        rec.hung.append(f"the struck command still running {timeout:.0f} s after the fault")
        command.kill()
        command.finish(30)
    rec.first_exit, rec.first_last_line = code, command.last_line()[:300]
    one_line_check(rec, command, code)
    return code


def after_fault(rec: Injection, work: Path, planted: dict[str, str]) -> Path | None:
    """Between the fault and the re-run: the newest usable checkpoint on disk, and a user's
    file put into the run folder (the re-run must keep it)."""
    rec.damaged.update(damaged_files(work, set(), "after the fault"))
    run = run_folder(work / "runs")
    rec.newest_on_disk = 0
    if run is not None:
        usable = checkpoints(run)
        rec.newest_on_disk = usable[0][0] if usable else 0
        plant(work, run / "notes.txt", planted)
    return run


def plant(work: Path, path: Path, planted: dict[str, str]) -> None:
    """A user's file at path, which nothing may delete or change."""
    path.write_text(f"a user's notes in {path.parent.name}\n")
    planted[str(path.relative_to(work))] = digest(path)


def rerun_training(lab: Lab, rec: Injection, work: Path, argv: list[Any]) -> Command:
    """Run the same training command again; its exit, last line and where it resumed."""
    rerun = lab.start(argv, work, f"{rec.kind}-{rec.seed}-rerun")
    code = rerun.finish()
    if code is None:
        rec.hung.append("the re-run still running after the timeout")
        rerun.kill()
        rerun.finish(30)
    rec.rerun_exit, rec.rerun_last_line = code, rerun.last_line()[:300]
    rec.resumed_from = resumed_step(rerun.output)
    return rerun


def judge_training(lab: Lab, rec: Injection, work: Path, reference: str) -> None:
    """The run's end state: finished, steps lost, resumed from the newest usable checkpoint,
    final weights against the reference."""
    run = run_folder(work / "runs")
    final = run / "checkpoints" / f"epoch_{EPOCHS:03d}.pt" if run else None
    rec.finished = rec.rerun_exit == 0 and final is not None and damage(final) is None
    if rec.last_step is not None and rec.resumed_from is not None:
        rec.steps_lost = rec.last_step - rec.resumed_from
    if rec.resumed_from is not None and rec.resumed_from != rec.newest_on_disk:
        rec.notes.append(f"miss: resumed after step {rec.resumed_from}; the newest usable "
                         f"checkpoint on disk was step {rec.newest_on_disk}")  # fmt: skip
    if rec.finished:
        rec.identical = same_weights(final, lab.reference(reference))


def check_files(rec: Injection, work: Path, planted: dict[str, str], skip: set[Path]) -> None:
    """After the re-run: damaged files, temporaries left, user files gone or changed."""
    rec.damaged.update(damaged_files(work, skip, "after the re-run"))
    rec.temporary_left = temporary_files(work)
    for name, value in planted.items():
        path = work / name
        if not path.is_file() or digest(path) != value:
            rec.user_files_deleted.append(name)


def user_files(work: Path) -> dict[str, str]:
    """The files of a user's that must outlive the fault and the re-run: notes.txt and the
    data, by digest."""
    return {
        str(p.relative_to(work)): digest(p)
        for p in [work / "notes.txt", *sorted((work / "data").rglob("*"))]
        if p.is_file()
    }


def finish_training(lab: Lab, rec: Injection, work: Path, first: Command, reference: str,
                    planted: dict[str, str]) -> None:  # fmt: skip
    """After the fault: the re-run of the same command, judged."""
    argv = first.argv
    after_fault(rec, work, planted)
    rerun = rerun_training(lab, rec, work, argv)
    judge_training(lab, rec, work, reference)
    rec.tracebacks = tracebacks(first, rerun)
    check_files(rec, work, planted, set())


def kill_trainer(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """SIGKILL of the training process: at a seeded step, or (a WRITE_SHARE of them) while the
    seeded nth checkpoint is being written."""
    work = lab.workspace(rec)
    planted = user_files(work)
    rec.method, rec.lost_bound = "SIGKILL (os.kill) of the command's process", CHECKPOINT_EVERY
    first = lab.start(lab.train_argv(work), work, f"{rec.kind}-{rec.seed}")
    if rng.random() < WRITE_SHARE:
        nth = rng.randint(1, 8)  # of about 10 checkpoint writes (6 mid-epoch, 3 epoch)
        name = catch_write(first, run_checkpoints_folder(first, work), nth)
        rec.fault = f"SIGKILL when the temp file of checkpoint write {nth} appeared"
        await_struck(first, rec)
        folder = run_folder(work / "runs")
        caught = bool(name and folder and (folder / "checkpoints" / name).exists())
        rec.where = (
            (
                f"step {first.last_step}, writing {name[1 : name.index('.pt') + 3]}"
                + ("" if caught else " (its rename came first)")
            )
            if name
            else "not struck"
        )
        if not name:
            raise RuntimeError(f"the fault never struck: no checkpoint write {nth} was seen")
    else:
        step = rng.randint(1, TOTAL_STEPS - 1)
        first.wait_for_step(step)
        os.kill(first.pid, signal.SIGKILL)
        rec.fault = f"SIGKILL after step {step} was logged"
        await_struck(first, rec)
        rec.where = f"step {first.last_step} (aimed at {step})"
    rec.last_step = first.last_step
    finish_training(lab, rec, work, first, "train", planted)


def catch_write(command: Command, folder: Path, nth: int) -> str | None:
    """SIGKILL the command when the nth checkpoint temp file (`.NAME.PID.tmp`, atomic_write's)
    appears in folder; returns its name, or None if the command ended first."""
    seen: set[str] = set()
    while command.alive():
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(folder):
                if CHECKPOINT_TMP.match(name) and name not in seen:
                    seen.add(name)
                    if len(seen) >= nth:
                        os.kill(command.pid, signal.SIGKILL)
                        return name
        time.sleep(0.0005)  # a tiny checkpoint takes a few milliseconds to write
    return None


def run_checkpoints_folder(command: Command, work: Path) -> Path:
    """The run's checkpoints folder, once the command has created the run folder."""
    command.wait_until(lambda: run_folder(work / "runs") is not None)
    folder = run_folder(work / "runs")
    return (folder or work / "runs" / "missing") / "checkpoints"


def rank_pid(launcher: int, rank: int, timeout: float = 120) -> int | None:
    """The pid of the process below the launcher that runs `rank` (env RANK), once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(launcher):
            if environ(pid).get("RANK") == str(rank):
                return pid
        time.sleep(0.2)
    return None


def steps_before_restart(lines: Sequence[str], killed_at: int) -> int:
    """The last step a group logged before its restart: step lines up to the first "resumed
    after step" line after the kill (line killed_at on), or, for a group restarted before its
    first checkpoint (it says nothing of resuming), up to the first step that counts again."""
    last = 0
    for i, line in enumerate(lines):
        if i >= killed_at and RESUMED.search(line):
            break
        if m := STEP_LINE.search(line):
            if i >= killed_at and int(m[1]) <= last:
                break
            last = max(last, int(m[1]))
    return last


def kill_rank(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """SIGKILL of rank 1 of a 2-process run at a seeded step: the launcher should restart the
    group (train.max_restarts) and the command finish by itself; if not, it is re-run."""
    work = lab.workspace(rec)
    planted = user_files(work)
    rec.method, rec.lost_bound = "SIGKILL of rank 1 (found by RANK in /proc)", CHECKPOINT_EVERY
    first = lab.start(lab.train_argv(work, **{"train.devices": 2}), work, f"{rec.kind}-{rec.seed}")
    step = rng.randint(2, TOTAL_STEPS - 2)
    first.wait_for_step(step)
    victim = rank_pid(first.pid, 1)
    if victim is None:
        raise RuntimeError("rank 1 was not found below the launcher")
    before = len(first.lines)
    os.kill(victim, signal.SIGKILL)
    rec.fault = f"SIGKILL of rank 1 (pid {victim}) after step {step} was logged"
    code = await_struck(first, rec)
    resumes = [(i, int(m[1])) for i, line in enumerate(first.lines)
               if i >= before and (m := RESUMED.search(line))]  # fmt: skip
    rec.last_step = steps_before_restart(first.lines, before)
    rec.where = f"step {rec.last_step} (aimed at {step})"
    if code == 0:  # the launcher's restart finished it: judge the command itself
        rec.rerun_exit, rec.rerun_last_line = 0, "(no re-run needed: the launcher restarted it)"
        rec.resumed_from = rec.newest_on_disk = resumes[0][1] if resumes else 0
        judge_training(lab, rec, work, "train-2")
        rec.tracebacks = tracebacks(first)
        check_files(rec, work, planted, set())
        return
    rec.notes.append(f"miss: the launcher did not finish the run by itself (exit {code})")
    finish_training(lab, rec, work, first, "train-2", planted)


def kill_server_run(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """SIGKILL of the Prefect server's process group during a training run that reports to it:
    the run should exit 75 with one line; the server restarts on the same database and port,
    and the same command finishes the run."""
    work = lab.workspace(rec)
    planted = user_files(work)
    rec.method, rec.lost_bound = "SIGKILL of `prefect server start`'s group", CHECKPOINT_EVERY
    first = lab.start(lab.train_argv(work), work, f"{rec.kind}-{rec.seed}")
    step = rng.randint(1, TOTAL_STEPS - 1)
    first.wait_for_step(step)
    lab.kill_server()
    rec.fault = f"server killed after step {step} was logged"
    code = await_struck(first, rec, timeout=120)
    rec.last_step = first.last_step
    rec.where = f"step {first.last_step} (aimed at {step})"
    if code != 75 or not first.last_line().startswith("error: the Prefect API at"):
        rec.notes.append(f"miss: expected exit 75 and the API line, got {code}: "
                         f"{first.last_line()[:160]!r}")  # fmt: skip
    lab.start_server()
    finish_training(lab, rec, work, first, "train", planted)


def read_only(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """The runs folder made read-only at a seeded step; made writable again, the same command
    must finish the run."""
    work = lab.workspace(rec)
    planted, runs = user_files(work), work / "runs"
    rec.lost_bound = CHECKPOINT_EVERY
    first = lab.start(lab.train_argv(work), work, f"{rec.kind}-{rec.seed}")
    step = rng.randint(1, TOTAL_STEPS - 1)
    first.wait_for_step(step)
    if lab.mounting:
        rec.method = "read-only bind mount over the runs folder (root)"
        lab.mounts.read_only(runs)
    elif lab.chmod_works:
        rec.method = "chmod a-w of the runs folder and everything in it (no mount permission)"
        for path in [runs, *runs.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    else:
        raise RuntimeError("no mount permission, and chmod does not stop this user's writes")
    rec.fault = f"runs folder read-only after step {step} was logged"
    user_error_check(rec, first, await_struck(first, rec))
    rec.last_step = first.last_step
    rec.where = f"step {first.last_step} (aimed at {step})"
    if lab.mounting:
        lab.mounts.release(runs)
    else:
        for path in [runs, *runs.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    finish_training(lab, rec, work, first, "train", planted)


def corruption_draw(rng: random.Random) -> tuple[str, str]:
    """A corrupt-checkpoint injection's first draws: how the first run ends (SIGTERM, SIGKILL
    or finished) and what damages the checkpoint (CORRUPTIONS)."""
    return rng.choice(["SIGTERM", "SIGKILL", "finished"]), rng.choice(CORRUPTIONS)


def corrupt_checkpoint(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """Between two runs (the first stopped by SIGTERM, SIGKILL, or finished), the newest usable
    checkpoint damaged (CORRUPTIONS): the re-run must warn and fall back to the previous one."""
    work = lab.workspace(rec)
    planted = user_files(work)
    ending, how = corruption_draw(rng)
    first = lab.start(lab.train_argv(work), work, f"{rec.kind}-{rec.seed}")
    if ending != "finished":
        step = rng.randint(CHECKPOINT_EVERY + 1, TOTAL_STEPS - 1)
        first.wait_for_step(step)
        os.killpg(first.pid, getattr(signal, ending))
    await_struck(first, rec)
    rec.last_step = first.last_step
    rec.damaged.update(damaged_files(work, set(), "after the fault"))
    run = run_folder(work / "runs")
    usable = checkpoints(run) if run else []
    if not usable:
        raise RuntimeError("no checkpoint to damage")
    target, marker = usable[0][2], work / "payload-ran"
    rec.method = f"{how}: {corrupt(target, how, rng, marker)}"
    rec.fault = f"{target.name} damaged after the run ended ({ending})"
    rec.where = f"{target.name} (step {usable[0][0]}); the run ended at step {rec.last_step}"
    damaged_copy = target.read_bytes()
    plant(work, run / "notes.txt", planted)
    rec.newest_on_disk = usable[1][0] if len(usable) > 1 else 0
    rec.lost_bound = rec.last_step - rec.newest_on_disk  # what losing that checkpoint costs
    rerun = rerun_training(lab, rec, work, first.argv)
    if f"skipping unusable checkpoint {target}" not in rerun.output:
        rec.notes.append(f"miss: the re-run did not warn about {target.name}")
    if marker.exists():
        rec.notes.append("miss: the pickled payload ran")
    judge_training(lab, rec, work, "train")
    rec.tracebacks = tracebacks(first, rerun)
    left = {target} if target.exists() and target.read_bytes() == damaged_copy else set()
    if left:
        rec.notes.append(f"{target.name} is still the damaged file the harness wrote")
    check_files(rec, work, planted, left | {marker})


# ---- disk full ----------------------------------------------------------------------------------


def disk_full(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """The disk fills while rec.target (one of DISK_TARGETS) is written; then the space comes
    back and the same command runs again."""
    writers = {"checkpoint": disk_full_checkpoint, "samples": disk_full_samples,
               "npz": disk_full_samples, "export": disk_full_export,
               "sweep.json": disk_full_sweep}  # fmt: skip
    writers[rec.target](lab, rec, rng)


def disk_full_checkpoint(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """A training run: at a seeded step, less room than a checkpoint takes."""
    work = lab.workspace(rec)
    planted, runs = user_files(work), work / "runs"
    size = lab.reference("train").stat().st_size
    rec.lost_bound = CHECKPOINT_EVERY
    if lab.mounting:
        lab.mounts.tmpfs(runs, 64 << 20)
    first = lab.start(lab.train_argv(work), work, f"{rec.kind}-{rec.seed}")
    step, leave = rng.randint(1, TOTAL_STEPS - 1), rng.randrange(size)
    first.wait_for_step(step)
    filler = None
    if lab.mounting:
        filler = fill(runs, leave)
        rec.method = f"64 MiB tmpfs on the runs folder, filled to {leave} bytes free"
    else:
        limit_file_size(first.pid, leave)
        rec.method = f"RLIMIT_FSIZE {leave} bytes on the running process (a checkpoint is {size})"
    rec.fault = f"disk full after step {step} was logged"
    user_error_check(rec, first, await_struck(first, rec))
    rec.last_step = first.last_step
    rec.where = f"step {first.last_step} (aimed at {step}): {first.last_line()[:100]}"
    if filler is not None:
        filler.unlink()
    finish_training(lab, rec, work, first, "train", planted)


def disk_full_samples(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """sample_flow.py writing 24 PNGs and the .npz: the disk fills among the PNGs ("samples")
    or during the .npz ("npz")."""
    reference, npz = lab.reference("samples"), rec.target == "npz"
    work = lab.workspace(rec)
    planted, disk, source = user_files(work), work / "disk", lab.reference("train").parents[1]
    out, before = disk / "samples", folder_digests(source)
    pngs = pages([*reference.glob("*.png"), reference / "generation.json"])
    npz_pages = pages(list(reference.glob("*.npz")))
    leave = (pngs + rng.randrange(npz_pages) if npz else rng.randrange(1, pngs)) * PAGE
    filler = None
    if lab.mounting:
        lab.mounts.tmpfs(disk, 8 << 20)
        filler = fill(disk, leave)
        rec.method = f"8 MiB tmpfs for the output, filled to {leave} bytes free"
    else:
        disk.mkdir()
    plant(work, disk / "notes.txt", planted)
    command = lab.start(lab.sample_argv(out), work, f"{rec.kind}-{rec.seed}")
    if not lab.mounting:
        limit = rng.randrange(PAGE, npz_pages * PAGE) if npz else 1024
        rec.method = f"RLIMIT_FSIZE {limit} bytes on the running process"
        sampler_limit(command, out, limit, 0 if npz else rng.randrange(1, SAMPLES))
    rec.fault = f"disk full while writing the {'.npz' if npz else 'images'}"
    code = await_struck(command, rec)
    user_error_check(rec, command, code)
    rec.damaged.update(damaged_files(work, set(), "after the fault"))
    written = len(list(out.glob("*.png"))) if out.is_dir() else 0
    rec.where = f"{rec.target}: {written} of {SAMPLES} images written; exit {code}"
    if filler is not None:
        filler.unlink()
    rerun = lab.start(lab.sample_argv(out), work, f"{rec.kind}-{rec.seed}-rerun")
    judge_files(rec, rerun, out, reference)
    rec.tracebacks = tracebacks(command, rerun)
    check_files(rec, work, planted, set())
    if folder_digests(source) != before:
        rec.user_files_deleted.append(f"the source run {source.name} changed")


def sampler_limit(command: Command, out: Path, limit: int, after_images: int) -> None:
    """(RLIMIT_FSIZE fallback) Limit the command's file size once `after_images` PNGs exist."""
    while command.alive() and len(list(out.glob("*.png")) if out.is_dir() else []) < after_images:
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError):
        limit_file_size(command.pid, limit)


def judge_files(rec: Injection, rerun: Command, out: Path, reference: Path) -> None:
    """The re-run of a command that writes a folder: finished, and byte for byte the folder of
    the same command never interrupted."""
    code = rerun.finish()
    if code is None:
        rec.hung.append("the re-run still running after the timeout")
        rerun.kill()
    rec.rerun_exit, rec.rerun_last_line = code, rerun.last_line()[:300]
    expected = folder_digests(reference)
    got = folder_digests(out) if out.is_dir() else {}
    rec.finished = code == 0 and expected.keys() <= got.keys()
    if rec.finished:
        rec.identical = all(got[name] == value for name, value in expected.items())


def disk_full_export(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """export_flow.py: the disk fills while the diffusers folder is written; half the time a
    previous export is in `--out` already, which a failed export must leave as it was."""
    reference = lab.reference("export")
    work = lab.workspace(rec)
    planted, disk, source = user_files(work), work / "disk", lab.reference("train").parents[1]
    out, before = disk / "export", folder_digests(source)
    size, previous = pages([p for p in reference.rglob("*") if p.is_file()]), rng.random() < 0.5
    leave = rng.randrange(size) * PAGE
    if lab.mounting:
        lab.mounts.tmpfs(disk, 8 << 20)
    else:
        disk.mkdir()
    if previous:
        shutil.copytree(reference, out)
    plant(work, disk / "notes.txt", planted)
    filler = None
    if lab.mounting:
        filler = fill(disk, leave)
        rec.method = f"8 MiB tmpfs for the output, filled to {leave} bytes free"
    command = lab.start(lab.export_argv(out), work, f"{rec.kind}-{rec.seed}")
    if not lab.mounting:
        limit = rng.randrange(16 << 10, 700 << 10)  # past the configs, before the weights' end
        limit_file_size(command.pid, limit)
        rec.method = f"RLIMIT_FSIZE {limit} bytes on the running process"
    rec.fault = "disk full while the export folder is written" + (
        " (a previous export in --out)" if previous else ""
    )
    code = await_struck(command, rec)
    user_error_check(rec, command, code)
    rec.damaged.update(damaged_files(work, set(), "after the fault"))
    rec.where = f"export: exit {code}: {command.last_line()[:100]}"
    if previous and code != 0 and folder_digests(out) != folder_digests(reference):
        rec.user_files_deleted.append("the previous export in --out, damaged by a failed export")
    if filler is not None:
        filler.unlink()
    rerun = lab.start(lab.export_argv(out), work, f"{rec.kind}-{rec.seed}-rerun")
    judge_files(rec, rerun, out, reference)
    rec.tracebacks = tracebacks(command, rerun)
    check_files(rec, work, planted, set())
    if folder_digests(source) != before:
        rec.user_files_deleted.append(f"the source run {source.name} changed")


# ---- sweeps -------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepRun:
    """One injection's sweep: its folder, spec name, user files and the first command."""

    work: Path
    name: str
    planted: dict[str, str]
    first: Command
    struck: int | None = None  # the trial running when the fault struck
    striker: Command | None = None  # the worker running it
    marks: dict[int, int] = dataclasses.field(default_factory=dict)  # worker pid: lines then

    @property
    def folder(self) -> Path:
        return self.work / "runs" / "sweeps" / self.name

    def states(self) -> list[str]:
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads((self.folder / "sweep.json").read_text())
            return [t["state"] for t in record["trials"]]
        return []


def start_sweep(lab: Lab, rec: Injection) -> SweepRun:
    """The injection's sweep command (lab.options.trials trials, one at a time), with a worker."""
    work = lab.workspace(rec)
    name = f"faults-{rec.seed}"
    spec = write_spec(work, name, lab.options.trials)
    planted = {**user_files(work), "sweep.yaml": digest(spec)}
    lab.ensure_worker()
    first = lab.start([BIN / "ddpm-sweep", "--spec", spec], work, f"{rec.kind}-{rec.seed}")
    return SweepRun(work, name, planted, first)


def strike_trial(lab: Lab, rec: Injection, rng: random.Random, sweep: SweepRun) -> None:
    """Wait for a seeded point among the sweep's steps (as the worker logs them); note the
    trial and step there, and where each worker's output stands."""
    worker = lab.worker
    position = rng.randint(1, lab.options.trials * TRIAL_STEPS - 1)
    base = len(worker.steps)
    worker.wait_until(lambda: len(worker.steps) - base >= position)
    rec.last_step = worker.steps[-1] if worker.steps else 0
    sweep.struck, sweep.striker = max(len(sweep.states()) - 1, 0), worker
    sweep.marks = {c.pid: len(c.lines) for c in lab.workers()}
    rec.where = f"trial-{sweep.struck:03d} step {rec.last_step}"


def last_struck_step(sweep: SweepRun) -> int:
    """The last step the struck trial logged before it stopped: its worker's step lines from
    the strike until a trial starts again (a trial that saw the server go keeps training a
    few steps)."""
    steps = []
    for line in sweep.striker.lines[sweep.marks[sweep.striker.pid] :]:
        if f"run {sweep.folder}/trial-" in line:
            break
        if m := STEP_LINE.search(line):
            steps.append(int(m[1]))
    return steps[-1] if steps else 0


def wait_or_stall(lab: Lab, command: Command, limit: float) -> int | None:
    """The command's exit status; None when it stalls (no output from it or any worker for
    options.stall seconds) or runs past limit (it is left running)."""
    start = time.monotonic()
    while command.alive():
        quiet = time.monotonic() - max(c.changed for c in [command, *lab.workers()])
        if quiet > lab.options.stall or time.monotonic() - start > limit:
            return None
        time.sleep(0.5)
    return command.finish(30)


def end_sweep(lab: Lab, rec: Injection, command: Command, label: str) -> int | None:
    """Wait for a sweep command; one that hangs is stopped as a user would stop it: Ctrl-C,
    Ctrl-C again a third of options.stall later ("a second Ctrl-C exits at once"), SIGKILL as
    long after that."""
    code = wait_or_stall(lab, command, COMMAND_TIMEOUT)
    if code is None:
        rec.hung.append(f"{label}: no progress for {lab.options.stall:.0f} s; stopped with Ctrl-C")
        for _ in range(2):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(command.pid, signal.SIGINT)
            if (code := command.finish(lab.options.stall / 3)) is not None:
                break
            rec.hung[-1] += ", Ctrl-C again"
        if code is None:
            rec.hung[-1] += ", SIGKILL"
            command.kill()
            command.finish(30)
    return code


def record_first(rec: Injection, sweep: SweepRun, code: int | None) -> None:
    """How the struck sweep command ended."""
    rec.first_exit, rec.first_last_line = code, sweep.first.last_line()[:300]
    one_line_check(rec, sweep.first, code)


def trial_restart(lab: Lab, sweep: SweepRun) -> int | None:
    """Where the struck trial resumed when it started again after the fault (0: from scratch),
    from the workers' output; None if it never started again."""
    folder = sweep.folder / f"trial-{sweep.struck:03d}"
    for worker in lab.workers():
        lines = worker.lines[sweep.marks.get(worker.pid, 0) :]
        starts = [i for i, line in enumerate(lines) if f"run {folder}; settings" in line]
        if starts:
            after = lines[starts[0] :]
            ends = [i for i, line in enumerate(after) if STEP_LINE.search(line)]
            return resumed_step("".join(after[: ends[0] if ends else len(after)]))
    return None


def rerun_sweep(lab: Lab, rec: Injection, sweep: SweepRun, label: str) -> tuple[Command, int]:
    """The same sweep command again (with a live worker), and its exit status."""
    lab.ensure_worker()
    rerun = lab.start([BIN / "ddpm-sweep", "--spec", sweep.work / "sweep.yaml"], sweep.work,
                      f"{rec.kind}-{rec.seed}-{label}")  # fmt: skip
    return rerun, end_sweep(lab, rec, rerun, f"the {label} sweep")


def judge_sweep(lab: Lab, rec: Injection, sweep: SweepRun) -> None:
    """Re-run the sweep: it must exit 0 with every trial Completed and each trial's final
    weights those of the uninterrupted sweep; the struck trial's steps lost. A re-run that
    hung is followed by one more (noted), as a user would try."""
    rec.damaged.update(damaged_files(sweep.work, set(), "after the fault"))
    rerun, code = rerun_sweep(lab, rec, sweep, "rerun")
    rec.rerun_exit, rec.rerun_last_line = code, rerun.last_line()[:300]
    states = sweep.states()
    rec.finished = code == 0 and states == ["Completed"] * lab.options.trials
    rec.notes.append(f"trial states after the re-run: {states}")
    if rec.hung and not rec.finished and lab.options.second_rerun:
        code = rerun_sweep(lab, rec, sweep, "second-rerun")[1]
        rec.notes.append(f"a second re-run exited {code} with trials {sweep.states()}")
    if sweep.struck is not None and rec.last_step is not None:
        rec.last_step = max(rec.last_step, last_struck_step(sweep))
        restart = trial_restart(lab, sweep)
        if restart is None and sweep.states()[sweep.struck : sweep.struck + 1] == ["Completed"]:
            restart = rec.last_step  # it was never started again: it ran on, losing nothing
            rec.notes.append(f"trial-{sweep.struck:03d} ran on through the fault")
        rec.resumed_from = restart
        rec.steps_lost = None if restart is None else rec.last_step - restart
    if rec.finished:
        reference = lab.reference("sweep")
        got = trial_checkpoints(sweep.work, sweep.name)
        same = [same_weights(got[t], reference[t]) for t in reference if t in got]
        rec.identical = reference.keys() == got.keys() and all(same)
    rec.tracebacks = tracebacks(sweep.first, rerun)
    in_workers = sum(c.output.count(TRACEBACK) for c in lab.workers())
    if in_workers:
        rec.notes.append(f"{in_workers} traceback(s) in the workers' output so far (the trials')")
    check_files(rec, sweep.work, sweep.planted, set())


def kill_worker(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """SIGKILL of the worker's process group during a trial (half the time with the trial's
    own process, which runs in a session of its own: the worker's host lost); a new worker
    starts, the sweep is waited for (stopped with Ctrl-C if it hangs) and re-run."""
    sweep = start_sweep(lab, rec)
    host_lost = rng.random() < 0.5
    strike_trial(lab, rec, rng, sweep)
    worker = lab.worker
    flow_runs = [p for p in descendants(worker.pid) if "prefect.engine" in cmdline(p)]
    if host_lost:
        worker.kill()
        rec.method = "SIGKILL of the worker's process group and its flow-run process (host lost)"
    else:
        lab.remember_strays(worker.pid)
        os.killpg(worker.pid, signal.SIGKILL)
        rec.method = "SIGKILL of the worker's process group"
    worker.finish(30)
    time.sleep(1)  # for the kernel to finish the killed ones off
    rec.lost_bound = CHECKPOINT_EVERY
    rec.fault = f"worker killed at step {rec.last_step} of trial-{sweep.struck:03d}"
    alive = [p for p in flow_runs if running(p)]
    rec.where += "; the trial's process " + ("was spared (a session of its own)" if alive
                                             else "was killed too")  # fmt: skip
    lab.ensure_worker()
    record_first(rec, sweep, end_sweep(lab, rec, sweep.first, "the sweep whose worker died"))
    judge_sweep(lab, rec, sweep)


def cmdline(pid: int) -> str:
    """A process's command line (empty once it is gone)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def kill_server_sweep(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """SIGKILL of the server's group during a sweep's trial; after a seeded outage (5 s to
    options.outage, shorter if the sweep ends first) the server restarts on its database and
    port; the sweep is waited for (stopped with Ctrl-C if it hangs) and re-run."""
    outage = rng.uniform(5.0, lab.options.outage)
    sweep = start_sweep(lab, rec)
    strike_trial(lab, rec, rng, sweep)
    worker = lab.worker
    lab.kill_server()
    down = time.monotonic()
    rec.method, rec.lost_bound = "SIGKILL of `prefect server start`'s group", CHECKPOINT_EVERY
    rec.fault = f"server killed at step {rec.last_step} of trial-{sweep.struck:03d}"
    sweep.first.finish(outage)
    lab.start_server()
    rec.fault += f", down {time.monotonic() - down:.0f} s (restarted after {outage:.0f} s)"
    record_first(rec, sweep, end_sweep(lab, rec, sweep.first, "the sweep whose server died"))
    rec.notes.append("the worker " + ("survived" if worker.alive() else "died of") + " the outage")
    judge_sweep(lab, rec, sweep)


def disk_full_sweep(lab: Lab, rec: Injection, rng: random.Random) -> None:
    """sweep.json: RLIMIT_FSIZE on the sweep's own process (also as root: a full disk would
    hit the trials' checkpoints in the same folder first), so that its record's writes fail
    once it grows past a seeded size."""
    sweep = start_sweep(lab, rec)
    limit = rng.randrange(300, 700 * lab.options.trials)  # the record grows ~700 bytes a trial
    limit_file_size(sweep.first.pid, limit)
    rec.method = f"RLIMIT_FSIZE {limit} bytes on the sweep's process"
    rec.fault = "sweep.json cannot grow past the limit"
    code = end_sweep(lab, rec, sweep.first, "the sweep that could not write")
    record_first(rec, sweep, code)
    user_error_check(rec, sweep.first, code)
    rec.where = f"sweep.json: exit {rec.first_exit}: {rec.first_last_line[:100]}"
    judge_sweep(lab, rec, sweep)


# ---- the batch ----------------------------------------------------------------------------------

INJECT = {
    "kill-trainer": kill_trainer, "kill-rank": kill_rank, "kill-worker": kill_worker,
    "kill-server-run": kill_server_run, "kill-server-sweep": kill_server_sweep,
    "disk-full": disk_full, "read-only": read_only, "corrupt-checkpoint": corrupt_checkpoint,
}  # fmt: skip


def plan(injections: int, seed: int, kinds: Sequence[str]) -> list[tuple[str, int]]:
    """(kind, seed) of each injection: `injections` spread evenly over the kinds, the
    remainder to kinds drawn at random; each injection's seed drawn from `seed`."""
    rng = random.Random(seed)
    counts = dict.fromkeys(kinds, injections // len(kinds))
    for kind in rng.sample(list(kinds), injections % len(kinds)):
        counts[kind] += 1
    first = rng.randrange(len(DISK_TARGETS))  # disk-full's targets in turn (the seed's residue)
    return [(kind, rng.randrange(1 << 28) * len(DISK_TARGETS)
             + ((first + i) % len(DISK_TARGETS) if kind == "disk-full" else rng.randrange(5)))
            for kind in kinds for i in range(counts[kind])]  # fmt: skip


def inject(lab: Lab, kind: str, seed: int) -> Injection:
    """Run one injection (all it does follows from kind and seed; disk-full's target is
    DISK_TARGETS[seed % 5]); an error of the harness itself is recorded, not raised."""
    rec, rng, start = Injection(kind, seed), random.Random(seed), time.monotonic()
    if kind == "disk-full":
        rec.target = DISK_TARGETS[seed % len(DISK_TARGETS)]
    mark = len(lab.commands)
    try:
        if lab.server is None or not lab.server.alive():
            lab.start_server()
        INJECT[kind](lab, rec, rng)
    except Exception:
        rec.harness_error = traceback.format_exc()[-3000:]
    finally:
        for command in lab.commands[mark:]:
            if command not in (lab.server, lab.worker):
                command.kill()
        lab.mounts.release()
        rec.seconds = round(time.monotonic() - start, 1)
    rec.misses = misses(rec) + (["harness error"] if rec.harness_error else [])
    return rec


@contextlib.contextmanager
def laboratory(keep: bool = False, options: Options | None = None) -> Iterator[Lab]:
    """A Lab in a fresh scratch folder, closed (processes, mounts) and removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="ddpm-faults-"))
    lab = None
    try:
        lab = Lab(root, options or Options())
        yield lab
    finally:
        if lab is not None:
            lab.close()
        if keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def summarize(records: Sequence[Injection]) -> dict[str, dict[str, Any]]:
    """Per kind: injections, finished on re-run, steps lost (max, median, the interval),
    damaged files, tracebacks, identical final weights, user files deleted, hangs."""
    summary = {}
    for kind in dict.fromkeys(r.kind for r in records):
        mine = [r for r in records if r.kind == kind]
        lost = [r.steps_lost for r in mine if r.steps_lost is not None]
        compared = [r for r in mine if r.identical is not None]
        summary[kind] = {
            "injections": len(mine),
            "finished_on_rerun": sum(r.finished for r in mine),
            "steps_lost_max": max(lost, default=None),
            "steps_lost_median": statistics.median(lost) if lost else None,
            "steps_lost_over_bound": sum(map(over_bound, mine)),
            "checkpoint_every": CHECKPOINT_EVERY,
            "damaged_files": sum(len(r.damaged) for r in mine),
            "temporary_files_left": sum(len(r.temporary_left) for r in mine),
            "tracebacks": sum(r.tracebacks for r in mine),
            "identical": {"compared": len(compared), "matched": sum(r.identical for r in compared)},
            "user_files_deleted": sum(len(r.user_files_deleted) for r in mine),
            "hung": sum(bool(r.hung) for r in mine),
            "harness_errors": sum(r.harness_error is not None for r in mine),
            "with_misses": sum(bool(r.misses) for r in mine),
        }  # fmt: skip
    return summary


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as the README's table."""
    head = (f"| fault | injections | finished on re-run | steps lost: max / median (checkpoint "
            f"every {CHECKPOINT_EVERY}) | lost more than promised | damaged files "
            "| temp files left | tracebacks shown | identical to an uninterrupted run "
            "| user files deleted | hangs | injections missing a target |")  # fmt: skip
    rows = [head, "|" + " --- |" * 12]
    for kind, s in summary.items():
        lost = "-"
        if s["steps_lost_max"] is not None:
            lost = f"{s['steps_lost_max']} / {s['steps_lost_median']:g}"
        same = f"{s['identical']['matched']}/{s['identical']['compared']}"
        rows.append(
            f"| {kind} | {s['injections']} | {s['finished_on_rerun']}/{s['injections']} "
            f"| {lost} | {s['steps_lost_over_bound']} | {s['damaged_files']} "
            f"| {s['temporary_files_left']} | {s['tracebacks']} | {same} "
            f"| {s['user_files_deleted']} | {s['hung']} | {s['with_misses']} |"
        )
    return "\n".join(rows) + "\n"


def checkout() -> dict[str, Any]:
    """The commit measured, and the files changed on top of it (read-only git commands)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.rstrip("\n")  # not strip(): porcelain lines start with a space

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": changed}


def append_line(path: Path, line: dict[str, Any]) -> None:
    """One JSON line appended and synced (a kill loses at most the line being written)."""
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def resume(journal: Path, head: dict[str, Any]) -> tuple[list[Injection], float, int]:
    """The records of an earlier sitting of the same batch (its journal's first line is head),
    the wall seconds it spent, and which sitting this is; a new journal where there is none. A
    journal of another batch or commit stops the command (a table is of one code and one plan)."""
    if not journal.exists():
        append_line(journal, {"head": head})
        return [], 0.0, 1
    lines = []
    for text in journal.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            break  # the line a kill tore, and nothing after it
    if not lines or json.loads(json.dumps(head)) != lines[0].get("head"):
        raise SystemExit(f"error: {journal} is the journal of another batch or commit; finish "
                         "that one (its command, at its commit) or remove the file")  # fmt: skip
    kept = [line for line in lines[1:] if "record" in line]
    sittings = 2 + sum("sitting" in line for line in lines)  # the first has no line of its own
    whole = journal.with_name(journal.name + ".tmp")  # without a torn last line
    whole.write_text("".join(json.dumps(line) + "\n" for line in lines))
    whole.replace(journal)
    append_line(journal, {"sitting": sittings, "after": len(kept)})
    wall = kept[-1]["wall_s"] if kept else 0.0
    print(f"resuming {journal}: {len(kept)} of {len(head['todo'])} injections recorded",
          file=sys.stderr, flush=True)  # fmt: skip
    return [Injection(**line["record"]) for line in kept], wall, sittings


def main(argv: list[str] | None = None) -> int:
    """Run the injections the flags ask for; write the JSON and the table; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--injections", type=int, default=len(KINDS),
                        help="spread evenly over the kinds")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="draws every injection's seed")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, of " +
                        ", ".join(KINDS))  # fmt: skip
    parser.add_argument("--only", help="KIND:SEED: one injection again, as a record names it")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/faults.json",
                        help="the JSON; the table goes beside it (.md)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--trials", type=int, default=Options.trials, help="trials of a sweep")
    parser.add_argument("--stall", type=float, default=Options.stall, help="seconds: a hang")
    parser.add_argument("--outage", type=float, default=Options.outage,
                        help="the longest seconds a killed server stays down")  # fmt: skip
    parser.add_argument(
        "--no-mount",
        action="store_true",
        help="the fallbacks (RLIMIT_FSIZE, chmod) even where mounting works",
    )
    args = parser.parse_args(argv)
    options = Options(args.trials, args.stall, args.outage, mount=not args.no_mount)
    if args.only:
        kind, seed = args.only.rsplit(":", 1)
        todo = [(kind, int(seed))]
    else:
        kinds = [k for k in args.kinds.split(",") if k]
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            parser.error(f"unknown kinds {unknown}; the kinds are {', '.join(KINDS)}")
        todo = plan(args.injections, args.seed, kinds)
    start, code = time.monotonic(), checkout()
    # A long batch is journaled: each record is appended as it ends, and the same command run
    # again (same flags, same commit) goes on after the last one recorded.
    head = {"todo": todo, "options": dataclasses.asdict(options), "commit": code["commit"]}
    journal = None if args.only else args.out.with_suffix(".journal.jsonl")
    records, before, sittings = resume(journal, head) if journal else ([], 0.0, 1)
    with laboratory(args.keep, options) as lab:
        for index, (kind, seed) in enumerate(todo[len(records) :], len(records)):
            records.append(inject(lab, kind, seed))
            rec = records[-1]
            print(f"[{index + 1}/{len(todo)}] {kind}:{seed} {rec.target} {rec.where} -> "
                  f"{'; '.join(rec.misses) or 'all targets met'} ({rec.seconds} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
            if journal:
                wall = round(before + time.monotonic() - start, 1)
                append_line(journal, {"record": dataclasses.asdict(rec), "wall_s": wall})
        mounting = lab.mounting
    summary = summarize(records)
    result = {
        "command": "python benchmarks/faults.py " + " ".join(argv or sys.argv[1:]),
        "seed": args.seed, "wall_s": round(before + time.monotonic() - start, 1),
        "sittings": sittings,
        "code": {"at_start": code, "at_end": checkout()},
        "machine": {"cpus": os.cpu_count(), "root": os.geteuid() == 0,
                    "faults_made_with": "tmpfs and bind mounts" if mounting else
                    "RLIMIT_FSIZE and chmod (no mount permission)"},
        "summary": summary, "injections": [dataclasses.asdict(r) for r in records],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(summary)
    args.out.with_suffix(".md").write_text(table)
    if journal:
        journal.unlink()  # everything it held is in the JSON
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
