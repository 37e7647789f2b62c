"""Damaged files the product reads (issue 34): a tiny real run folder, sweep record, sample
folder, export and image folder are written by the product's own writers, then damaged in
generated ways (emptied, truncated at any byte, bits flipped, random bytes, another JSON type,
another encoding). Every read must end in the documented outcome: the file accepted as it is,
recovered from what else the folder holds (then the value is what the good copy held, or an
earlier good one), or refused by the product's one-line error naming the file; never a
traceback, and never a changed file (reading repairs nothing on disk).

Each kind counts its outcomes, prints them (`pytest -s`), and fails unless both a good and a bad
outcome occurred. The Hypothesis profile (tests/conftest.py) sets how many cases.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from case_tally import Tally
from hypothesis import example, given, note
from hypothesis import strategies as st
from PIL import Image
from tiny_run import make_config

from ddpm.build import build_training
from ddpm.checkpoint import CheckpointError, checksum_path, load_checkpoint
from ddpm.errors import DatasetError, UserError
from ddpm.files import DamagedFile, NotOurs, write_checked
from ddpm.generate import load_trained_model
from ddpm.image_folders import ImageFolderDataset
from ddpm.images import GenerationError, ImageFiles
from ddpm.marked_folders import EXPORT_MARKER, check_export_target, write_marker
from ddpm.run_dir import RunDir, keep_best, load_newest_valid, save_epoch_checkpoint
from flows.sweep.record import Trial, read_record, write_record
from settings import flatten, load_settings, result_changes
from settings.sweep import SpecError, spec_from

# The module's tests share its run, sweep, sample and export folders (module fixtures): one
# pytest-xdist worker runs them, in order, so they are built once.
pytestmark = pytest.mark.xdist_group("bad_files")

# ---------------------------------------------------------------------------------------------
# Counting cases

TALLY = Tally("test_bad_files")
_summary = TALLY.summary()

# ---------------------------------------------------------------------------------------------
# Damage, and proof that reading changed nothing


def _apply(damage: tuple[Any, ...], data: bytes) -> bytes:
    """Damage bytes: ("none",), ("empty",), ("truncate", at), ("flip", [(at, bit), ...]), ("random",
    bytes), ("overwrite", at, bytes), ("append", bytes), ("json", value), ("encoding", name)."""
    how, *args = damage
    n = max(len(data), 1)
    if how == "none":
        return data
    if how == "empty":
        return b""
    if how == "truncate":
        return data[: args[0] % n]
    if how == "flip":
        out = bytearray(data)
        for at, bit in args[0]:
            if out:
                out[at % n] ^= 1 << bit
        return bytes(out)
    if how == "random":
        return args[0]
    if how == "overwrite":
        at = args[0] % n
        return data[:at] + args[1] + data[at + len(args[1]) :]
    if how == "append":
        return data + args[0]
    if how == "json":
        return json.dumps(args[0]).encode()
    text = data.decode("utf-8", "replace")
    if args[0] == "latin-1":
        return (text[: len(text) // 2] + "é" + text[len(text) // 2 :]).encode("latin-1", "replace")
    return text.encode(args[0])


AT = st.integers(0, 2**31)
BYTE_DAMAGE = st.one_of(
    st.just(("none",)),  # so that a kind sees its good outcome too
    st.just(("empty",)),
    st.tuples(st.just("truncate"), AT),
    st.tuples(st.just("flip"), st.lists(st.tuples(AT, st.integers(0, 7)), min_size=1, max_size=6)),
    st.tuples(st.just("random"), st.binary(max_size=48)),
    st.tuples(st.just("overwrite"), AT, st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=12)),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=6,
)  # fmt: skip
TEXT_DAMAGE = st.one_of(
    BYTE_DAMAGE,
    st.tuples(st.just("json"), JSON_VALUES),
    st.tuples(st.just("encoding"), st.sampled_from(["utf-16", "utf-8-sig", "latin-1", "utf-32"])),
)


def _snapshot(folder: Path) -> dict[str, Any]:
    """Every entry under folder: a file's bytes, mode and mtime, a link's target, a folder."""
    seen: dict[str, Any] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            info = path.lstat()
            key = path.relative_to(folder).as_posix()
            if stat.S_ISLNK(info.st_mode):
                seen[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                seen[key] = ("file", path.read_bytes(), info.st_mode, info.st_mtime_ns)
            else:
                seen[key] = ("other", stat.S_IFMT(info.st_mode))
    return seen


@contextlib.contextmanager
def _unchanged(folder: Path) -> Iterator[None]:
    """Fail if anything under folder is added, removed or changed (bytes, mode, mtime)."""
    before = _snapshot(folder)
    yield
    after = _snapshot(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"reading changed files: {changed}"


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    """The product's warnings (the ddpm logger's) logged inside."""
    handler, logger = _Warnings(), logging.getLogger("ddpm")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def _one_line_naming(err: BaseException, *names: object) -> None:
    """The product's error for a user: one line naming one of `names` (a file, a folder)."""
    assert isinstance(err, UserError), f"not the product's error: {type(err).__name__}: {err}"
    message = str(err)
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert any(str(n) in message for n in names), f"none of {names} named: {message}"


def _damage_file(path: Path, damage: tuple[Any, ...], checked: bool) -> bytes:
    """Damage a file in place; without its SHA-256 file when not `checked` (a file from a
    version that wrote none, or a copy); returns the damaged bytes."""
    if not checked:
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
    data = _apply(damage, path.read_bytes())
    path.write_bytes(data)
    return data


def _json_of(data: bytes) -> Any:
    """The JSON value of bytes, or None where they hold none (not UTF-8, not JSON)."""
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None


@contextlib.contextmanager
def _copy(pristine: Path, base: Path) -> Iterator[Path]:
    """A fresh copy of a pristine folder under base, removed after."""
    folder = Path(tempfile.mkdtemp(dir=base)) / pristine.name
    shutil.copytree(pristine, folder, symlinks=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A tiny real run, written by the product's writers

ROWS = [
    {"epoch": 1, "loss": 0.61, "lr": 1e-3, "images_per_s": 90.5, "seconds": 1.5, "fid": 50.0,
     "kid": 0.2},
    {"epoch": 2, "loss": 0.52, "lr": 1e-3, "images_per_s": 91.0, "seconds": 1.4, "fid": 40.0,
     "kid": 0.1},
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/tiny: settings.json, metrics.jsonl, epoch_001.pt and epoch_002.pt (each with the
    settings and the rows so far, and its .sha256), best.pt and best.json (epoch 2's FID)."""
    folder = tmp_path_factory.mktemp("runs") / "tiny"
    settings = load_settings({"model.hidden_size": 8, "run.dir": str(folder.parent)},
                             env_file=None).model_dump(mode="json")  # fmt: skip
    state = build_training(make_config(), 10, settings)
    run = RunDir(folder)
    for epoch in (1, 2):
        state.epoch, state.global_step = epoch, 2 * epoch
        snapshot = {**state.snapshot(), "metrics": ROWS[:epoch]}
        checkpoint = save_epoch_checkpoint(snapshot, run, keep=3)
        keep_best(run, checkpoint, epoch, {k: ROWS[epoch - 1][k] for k in ("fid", "kid")})
    # As train_flow writes it: checked (its SHA-256 beside it).
    write_checked(run.settings_file, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    run.write_metrics(ROWS)
    return folder


def _tensors_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _tensors_equal(a[k], b[k]) for k in a)  # fmt: skip
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def originals(run: Path) -> dict[str, Any]:
    """What the good files hold: each checkpoint's state, the settings, best.json."""
    r = RunDir(run)
    return {
        "epoch_001.pt": load_checkpoint(r.epoch_checkpoint(1)),
        "epoch_002.pt": load_checkpoint(r.epoch_checkpoint(2)),
        "settings": json.loads(r.settings_file.read_text()),
        "best": json.loads(r.best_record.read_text()),
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.slow(seconds=8)
def test_damaged_checkpoint_or_checksum_is_refused_by_name(
    run: Path, originals: dict[str, Any], tmp_path: Path
) -> None:
    """A checkpoint read with its .sha256 beside it, either damaged any way, loads exactly as
    written or is refused by a one-line CheckpointError naming it; nothing is changed."""

    @given(target=st.sampled_from(["checkpoint", "sha256", "both"]), damage=BYTE_DAMAGE,
           also=TEXT_DAMAGE)  # fmt: skip
    @example(target="sha256", damage=("random", b"\xff\xfe"), also=("empty",))
    def cases(target: str, damage: tuple[Any, ...], also: tuple[Any, ...]) -> None:
        with _copy(run, tmp_path) as folder:
            path = RunDir(folder).epoch_checkpoint(2)
            if target != "sha256":
                path.write_bytes(_apply(damage, path.read_bytes()))
            if target != "checkpoint":
                sha = checksum_path(path)
                sha.write_bytes(_apply(also if target == "both" else damage, sha.read_bytes()))
            with _unchanged(folder):
                try:
                    state = load_checkpoint(path)
                except CheckpointError as err:
                    _one_line_naming(err, path)
                    TALLY["checkpoint"]["refused"] += 1
                    return
            assert _tensors_equal(state, originals["epoch_002.pt"]), "a changed file was loaded"
            TALLY["checkpoint"]["accepted"] += 1

    cases()
    TALLY.saw("checkpoint", "accepted", "refused")


@pytest.mark.slow(seconds=10)
def test_damaged_checkpoint_given_as_the_run_is_refused_by_name(run: Path, tmp_path: Path) -> None:
    """A lone checkpoint file (a copy, no .sha256), damaged any way and given as
    `ddpm-sample --run`, gives its network or a one-line CheckpointError naming it."""

    @given(damage=BYTE_DAMAGE, use_ema=st.booleans())
    @example(damage=("truncate", 1000), use_ema=True)
    def cases(damage: tuple[Any, ...], use_ema: bool) -> None:
        with _copy(run, tmp_path) as folder:
            path = folder / "copy.pt"
            path.write_bytes(_apply(damage, RunDir(folder).epoch_checkpoint(2).read_bytes()))
            with _unchanged(folder):
                try:
                    trained = load_trained_model(path, use_ema=use_ema)
                except CheckpointError as err:
                    _one_line_naming(err, path)
                    TALLY["checkpoint(--run)"]["refused"] += 1
                    return
            assert trained.checkpoint == path and trained.image_shape == (3, 32, 32)
            TALLY["checkpoint(--run)"]["accepted"] += 1

    cases()
    TALLY.saw("checkpoint(--run)", "accepted", "refused")


NEWEST_DAMAGE = st.tuples(
    st.sampled_from(["epoch_002.pt", "epoch_002.pt.sha256", "both", "all", "none"]),
    BYTE_DAMAGE,
)


@pytest.mark.slow(seconds=15)
def test_damaged_newest_checkpoint_falls_back_to_an_older_good_one(
    run: Path, originals: dict[str, Any], tmp_path: Path
) -> None:
    """With the newest checkpoint (or its checksum, or every checkpoint) damaged, the run
    resumes from the newest one that is as written, each skipped one named in one warning
    line, or from none; nothing is changed."""

    @given(case=NEWEST_DAMAGE)
    @example(case=("epoch_002.pt.sha256", ("random", b"\xff")))
    def cases(case: tuple[str, tuple[Any, ...]]) -> None:
        which, damage = case
        with _copy(run, tmp_path) as folder:
            r = RunDir(folder)
            names = {"both": ["epoch_002.pt", "epoch_002.pt.sha256"], "none": [],
                     "all": ["epoch_001.pt", "epoch_002.pt"]}.get(which, [which])  # fmt: skip
            for name in names:
                file = r.checkpoints / name
                file.write_bytes(_apply(damage, file.read_bytes()))
            with _unchanged(folder), _warnings() as warned:
                found = load_newest_valid(r)
        assert all("\n" not in w for w in warned), warned
        if found is None:
            assert which == "all" and len(warned) == 2, warned
            TALLY["newest checkpoint"]["none left"] += 1
            return
        path, state = found
        assert _tensors_equal(state, originals[path.name]), f"{path.name} loaded changed"
        if path.name == "epoch_001.pt":
            assert len(warned) == 1 and "epoch_002.pt" in warned[0], warned
            TALLY["newest checkpoint"]["fell back"] += 1
        else:
            assert not warned, warned
            TALLY["newest checkpoint"]["newest"] += 1

    cases()
    TALLY.saw("newest checkpoint", "newest", "fell back")


# ---------------------------------------------------------------------------------------------
# The run's JSON files


@pytest.mark.slow(seconds=10)
def test_damaged_settings_json_is_recovered_from_a_checkpoint_or_read_as_it_is(
    run: Path, originals: dict[str, Any], tmp_path: Path
) -> None:
    """A damaged settings.json (checked or not) reads as the JSON object it still is, or, with
    one warning line, as the settings the newest checkpoint saved (None without one); the file
    is not rewritten, and the run's check of its settings against it ends, if it fails, with
    the product's error."""
    cfg = load_settings(flatten(originals["settings"]), env_file=None)  # the run's own

    @given(damage=TEXT_DAMAGE, checked=st.booleans(), checkpoints=st.booleans())
    @example(damage=("json", {"diffusion": [1]}), checked=False, checkpoints=True)
    @example(damage=("json", {"model": 3}), checked=False, checkpoints=True)
    def cases(damage: tuple[Any, ...], checked: bool, checkpoints: bool) -> None:
        with _copy(run, tmp_path) as folder:
            r = RunDir(folder)
            text = _damage_file(r.settings_file, damage, checked)
            if not checkpoints:
                shutil.rmtree(r.checkpoints)
            with _unchanged(folder), _warnings() as warned:
                saved = r.saved_settings()
        if not warned:  # read as it is: the file's JSON object
            assert saved == _json_of(text) and isinstance(saved, dict), saved
            kind = "accepted"
        else:
            assert len(warned) == 1 and "settings.json" in warned[0] and "\n" not in warned[0]
            assert saved == (originals["settings"] if checkpoints else None)
            assert damage != ("none",), "an intact file was called damaged"
            kind = "recovered" if checkpoints else "none"
        if saved is not None:
            try:  # what train_flow does with them
                changes = result_changes(saved, cfg)
            except UserError as err:
                _one_line_naming(err, "settings")
            else:
                assert kind == "accepted" or changes == [], changes
        TALLY["settings.json"][kind] += 1

    cases()
    TALLY.saw("settings.json", "accepted", "recovered", "none")


def _parsed_lines(text: bytes) -> list[Any]:
    try:
        lines = text.decode().splitlines()
    except UnicodeDecodeError:
        return [None]
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            rows.append(None)
    return rows


def _is_row(row: Any) -> bool:
    return isinstance(row, dict) and isinstance(row.get("epoch"), int)


@pytest.mark.slow(seconds=7)
def test_damaged_metrics_rows_are_recovered_from_the_checkpoint(run: Path, tmp_path: Path) -> None:
    """A damaged metrics.jsonl (checked or not) reads as its rows when every line still is one;
    otherwise, with one warning line, as the newest checkpoint's rows (as the good file held
    them) plus good lines after them, in epoch order; the file is not rewritten."""

    @given(damage=TEXT_DAMAGE, checked=st.booleans(), checkpoints=st.booleans())
    @example(damage=("append", b'{"epoch": 3, "loss": 1}\n{"epoch": true}\n'), checked=False,
             checkpoints=True)  # fmt: skip
    def cases(damage: tuple[Any, ...], checked: bool, checkpoints: bool) -> None:
        with _copy(run, tmp_path) as folder:
            r = RunDir(folder)
            text = _damage_file(r.metrics_file, damage, checked)
            if not checkpoints:
                shutil.rmtree(r.checkpoints)
            with _unchanged(folder), _warnings() as warned:
                rows = r.metrics_rows()
        lines = _parsed_lines(text)
        if not warned:  # read as it is
            assert all(_is_row(row) for row in lines) and rows == lines, rows
            TALLY["metrics.jsonl"]["accepted"] += 1
            return
        assert len(warned) == 1 and "metrics.jsonl" in warned[0] and "\n" not in warned[0]
        assert damage != ("none",), "an intact file was called damaged"
        epochs = [row["epoch"] for row in rows]
        assert epochs == sorted(set(epochs)), epochs
        good = [row for row in lines if _is_row(row)]
        for row in rows:
            if checkpoints and row["epoch"] <= len(ROWS):
                assert row == ROWS[row["epoch"] - 1], row
            else:
                assert row in good, row
        if checkpoints:
            assert rows[: len(ROWS)] == ROWS
        TALLY["metrics.jsonl"]["recovered"] += 1

    cases()
    TALLY.saw("metrics.jsonl", "accepted", "recovered")


@pytest.mark.slow(seconds=5)
def test_damaged_best_json_is_recovered_from_the_metrics_rows(
    run: Path, originals: dict[str, Any], tmp_path: Path
) -> None:
    """A damaged best.json (checked or not; the metrics rows damaged too, or not) reads as the
    object it still is when it holds a FID, or, with a warning, as the good copy held it (from
    the rows); no file is rewritten."""

    @given(damage=TEXT_DAMAGE, checked=st.booleans(),
           rows_too=st.sampled_from([None, ("empty",), ("truncate", 40)]))  # fmt: skip
    @example(damage=("json", {"fid": "40"}), checked=False, rows_too=None)
    def cases(damage: tuple[Any, ...], checked: bool, rows_too: tuple[Any, ...] | None) -> None:
        with _copy(run, tmp_path) as folder:
            r = RunDir(folder)
            text = _damage_file(r.best_record, damage, checked)
            if rows_too:
                _damage_file(r.metrics_file, rows_too, checked)
            with _unchanged(folder), _warnings() as warned:
                best = r.best()
        assert all("\n" not in w for w in warned), warned
        as_is = _json_of(text)
        if not any("best.json" in w for w in warned):  # read as it is
            assert isinstance(as_is, dict) and isinstance(as_is.get("fid"), (int, float))
            assert best == as_is, best
            TALLY["best.json"]["accepted"] += 1
            return
        assert damage != ("none",), "an intact file was called damaged"
        earlier = {"fid": 50.0, "kid": 0.2, "epoch": 1, "checkpoint": "epoch_001.pt"}
        if rows_too == ("empty",) and not checked:  # no rows left: an earlier good record
            assert best in (None, earlier, originals["best"]), best
        else:
            assert best == originals["best"], best
        TALLY["best.json"]["recovered"] += 1

    cases()
    TALLY.saw("best.json", "accepted", "recovered")


# ---------------------------------------------------------------------------------------------
# A sweep's record, a sample folder's record, an export's marker

SPEC = spec_from({"name": "damaged", "vary": {"optim.lr": [1e-4, 2e-4]}})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/sweeps/damaged/sweep.json with two trials, one finished."""
    folder = tmp_path_factory.mktemp("sweeps") / "damaged"
    trials = {
        0: Trial(0, {"optim.lr": 1e-4}, state="Completed", metric=0.5, curve=[[1, 0.6], [2, 0.5]]),
        1: Trial(1, {"optim.lr": 2e-4}, state="Crashed", message="killed"),
    }
    write_record(folder, SPEC, trials)
    return folder


def test_damaged_sweep_record_is_read_or_refused_by_name(sweep: Path, tmp_path: Path) -> None:
    """A damaged sweep.json reads as trials with an index and settings each (the recorded ones
    when it still holds them) or is refused by one line naming it; it is not rewritten."""
    original = read_record(sweep, SPEC)

    @given(damage=TEXT_DAMAGE, checked=st.booleans())
    @example(damage=("json", {"spec": {}, "trials": [[1]]}), checked=False)
    @example(damage=("json", {"spec": {}, "trials": [{"index": "0", "values": {}}]}),
             checked=False)  # fmt: skip
    def cases(damage: tuple[Any, ...], checked: bool) -> None:
        with _copy(sweep, tmp_path) as folder:
            path = folder / "sweep.json"
            text = _damage_file(path, damage, checked)
            with _unchanged(folder):
                try:
                    trials = read_record(folder, SPEC)
                except (DamagedFile, SpecError) as err:
                    _one_line_naming(err, path, folder)
                    TALLY["sweep.json"]["refused"] += 1
                    return
        assert all(isinstance(t, Trial) and t.index == i and isinstance(t.values, dict)
                   for i, t in trials.items())  # fmt: skip
        if _json_of(text)["trials"] == _json_of((sweep / "sweep.json").read_bytes())["trials"]:
            assert trials == original
        TALLY["sweep.json"]["accepted"] += 1

    cases()
    TALLY.saw("sweep.json", "accepted", "refused")


OPTIONS = {"checkpoint": "runs/tiny/checkpoints/epoch_002.pt", "step": 4, "seed": 0,
           "sampler": "ddim", "steps": 5, "eta": 1.0, "batch_size": 2, "precision": "fp32",
           "device_type": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sample folder ddpm-sample drew into: generation.json and two PNGs."""
    folder = tmp_path_factory.mktemp("samples") / "out"
    files = ImageFiles(folder, 2)
    files.claim(OPTIONS)
    files.write(range(2), torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    return folder


def test_damaged_generation_record_is_refused_by_name(samples: Path, tmp_path: Path) -> None:
    """A damaged generation.json lets the same options resume the folder only when it still
    records them; otherwise one line names the folder or the file; nothing is changed."""

    @given(damage=TEXT_DAMAGE, checked=st.booleans(),
           gone=st.sampled_from([None, "removed", "a folder"]))  # fmt: skip
    @example(damage=("json", [1]), checked=False, gone=None)
    def cases(damage: tuple[Any, ...], checked: bool, gone: str | None) -> None:
        with _copy(samples, tmp_path) as folder:
            record = folder / "generation.json"
            text = _damage_file(record, damage, checked)
            if gone:
                record.unlink()
                if gone == "a folder":
                    record.mkdir()
            with _unchanged(folder):
                try:
                    ImageFiles(folder, 2).claim(OPTIONS)
                except (GenerationError, DamagedFile, NotOurs) as err:
                    _one_line_naming(err, folder)
                    TALLY["generation.json"]["refused"] += 1
                    return
        saved = _json_of(text)
        assert not gone and all(saved.get(k) == v for k, v in OPTIONS.items()), saved
        TALLY["generation.json"]["accepted"] += 1

    cases()
    TALLY.saw("generation.json", "accepted", "refused")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export's folder as ddpm-export leaves it: its files and .ddpm-export.json."""
    folder = tmp_path_factory.mktemp("export") / "tiny"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text('{"sample_size": 32}\n')
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(256))
    (folder / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}\n')
    (folder / "README.md").write_text("# tiny\n")
    write_marker(folder, EXPORT_MARKER, "ddpm-export")
    return folder


EXPORT_DAMAGE = st.tuples(
    st.sampled_from([EXPORT_MARKER, "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "README.md", "added", "removed", "marker removed"]),
    TEXT_DAMAGE,
)  # fmt: skip


def test_damaged_export_is_replaced_only_when_it_is_as_written(
    exported: Path, tmp_path: Path
) -> None:
    """An earlier export with its marker or a file damaged, a file added or removed, may be
    replaced only when every file is as the marker lists it; otherwise one line names the
    folder and --out; nothing is changed."""

    @given(case=EXPORT_DAMAGE)
    @example(case=(EXPORT_MARKER, ("json", {"files": {"README.md": 1}})))
    def cases(case: tuple[str, tuple[Any, ...]]) -> None:
        which, damage = case
        with _copy(exported, tmp_path) as folder:
            if which == "added":
                (folder / "notes.txt").write_bytes(_apply(damage, b"mine"))
            elif which == "removed":
                (folder / "README.md").unlink()
            elif which == "marker removed":
                (folder / EXPORT_MARKER).unlink()
            else:
                (folder / which).write_bytes(_apply(damage, (folder / which).read_bytes()))
            with _unchanged(folder):
                try:
                    check_export_target(folder)
                except NotOurs as err:
                    _one_line_naming(err, folder)
                    assert "--out" in str(err)
                    TALLY[".ddpm-export.json"]["refused"] += 1
                    return
            listed = json.loads((folder / EXPORT_MARKER).read_text())["files"]
            files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                           if p.is_file() and p.name != EXPORT_MARKER)  # fmt: skip
            assert set(files) <= set(listed), (files, listed)
        TALLY[".ddpm-export.json"]["accepted"] += 1

    cases()
    TALLY.saw(".ddpm-export.json", "accepted", "refused")


# ---------------------------------------------------------------------------------------------
# Image folders


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height pixels, with almost no pixel data: a
    decompression bomb's header."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _bomb_jpeg(width: int, height: int) -> bytes:
    """A JPEG's start and frame header declaring width x height pixels, and nothing after."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def _image(fmt: str, mode: str = "RGB", size: tuple[int, int] = (40, 36)) -> bytes:
    rng = np.random.default_rng(len(fmt) + len(mode))
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, format=fmt)
    return buffer.getvalue()


GOOD = {"a.png": _image("PNG"), "b.jpg": _image("JPEG"), "c/d.jpeg": _image("JPEG"),
        "e.png": _image("PNG", "L")}  # fmt: skip
BAD_ENTRY = st.one_of(
    st.tuples(st.just("damaged"), st.sampled_from(sorted(GOOD)), BYTE_DAMAGE),
    st.tuples(st.just("random"), st.sampled_from(["r.png", "r.jpg", "r.JPEG", "s/r.png"]),
              st.binary(max_size=64)),
    st.tuples(st.just("format"), st.sampled_from(["f.png", "f.jpg"]),
              st.sampled_from(["BMP", "GIF", "TIFF", "WEBP", "text"])),
    st.tuples(st.just("bomb"), st.just("bomb.png"),
              st.sampled_from([(100_000, 100_000), (1, 2**31 - 1), (20_000, 10_000)])),
    st.tuples(st.just("bomb"), st.just("bomb.jpg"), st.sampled_from([(65_500, 65_500)])),
    st.tuples(st.just("special"), st.sampled_from(["loop.png", "up", "dangling.jpg",
                                                  "unreadable.png", "dir.png", "fifo.jpg",
                                                  "empty.png"]), st.none()),
)  # fmt: skip


def _plant(folder: Path, entry: tuple[str, str, Any]) -> None:
    """Put one bad entry into an image folder."""
    how, name, arg = entry
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "damaged":
        path.write_bytes(_apply(arg, GOOD[name]))
    elif how == "random":
        path.write_bytes(arg)
    elif how == "format":
        path.write_bytes(b"just some text\n" if arg == "text" else _image(arg))
    elif how == "bomb":
        path.write_bytes((_bomb_png if name.endswith(".png") else _bomb_jpeg)(*arg))
    elif name == "loop.png":
        path.symlink_to("loop.png")
    elif name == "up":  # a folder that holds itself
        (folder / "c").mkdir(exist_ok=True)
        (folder / "c" / "up").symlink_to("..")
    elif name == "dangling.jpg":
        path.symlink_to("nowhere.jpg")
    elif name == "unreadable.png":  # root reads a mode-000 file: also a file whose read fails
        path.write_bytes(GOOD["a.png"])
        path.chmod(0)
        (folder / "eio.png").symlink_to("/proc/self/mem")
    elif name == "dir.png":
        path.mkdir()
        (path / "inner.txt").write_text("not an image")
    elif name == "fifo.jpg":
        os.mkfifo(path)
    else:
        path.write_bytes(b"")


def test_image_folders_with_bad_files_load_or_are_refused_by_name(tmp_path: Path) -> None:
    """An image folder with damaged, truncated, random, mislabelled, bomb, looping, unreadable
    or folder-shaped entries keeps every intact image and loads each image it keeps at the
    asked size, or is refused by one line naming the folder; nothing is changed."""

    @given(keep=st.sets(st.sampled_from(sorted(GOOD))),
           bad=st.lists(BAD_ENTRY, max_size=3, unique_by=lambda entry: entry[1]),
           channels=st.sampled_from([1, 3]))  # fmt: skip
    @example(keep={"a.png"}, bad=[("bomb", "bomb.png", (100_000, 100_000))], channels=3)
    @example(keep={"a.png"}, bad=[("damaged", "b.jpg", ("truncate", 1000))], channels=3)
    def cases(keep: set[str], bad: list[tuple[str, str, Any]], channels: int) -> None:
        base = Path(tempfile.mkdtemp(dir=tmp_path))
        folder = base / "images"
        folder.mkdir()
        try:
            for name in keep:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(GOOD[name])
            for entry in bad:
                _plant(folder, entry)
            intact = {n for n in keep if (folder / n).read_bytes() == GOOD[n]}
            note(f"intact: {sorted(intact)}")
            with _unchanged(folder):
                try:
                    data = ImageFolderDataset(folder, 32, channels)
                    items = [data[i] for i in range(len(data))]
                except DatasetError as err:
                    _one_line_naming(err, folder)
                    assert not intact, f"refused with intact images {sorted(intact)}: {err}"
                    TALLY["image folder"]["refused"] += 1
                    return
            kept = {p.relative_to(folder).as_posix() for p in data.paths}
            assert intact <= kept, (intact, kept)
            assert all(x.shape == (channels, 32, 32) and x.dtype == torch.uint8 for x in items)
            TALLY["image folder"]["accepted"] += 1
        finally:
            for path in folder.rglob("*"):
                if not path.is_symlink() and path.is_file():
                    path.chmod(0o644)
            shutil.rmtree(base, ignore_errors=True)

    cases()
    TALLY.saw("image folder", "accepted", "refused")


def test_the_tiny_run_is_read_back_whole(run: Path, originals: dict[str, Any]) -> None:
    """The undamaged run reads back as written: the newest checkpoint, the settings, the rows
    and best.json (so a damaged read is compared with what the product really wrote)."""
    r = RunDir(run)
    path, state = load_newest_valid(r)
    assert path.name == "epoch_002.pt" and state["metrics"] == ROWS
    assert r.saved_settings() == originals["settings"] == state["settings"]
    assert r.metrics_rows() == ROWS
    assert r.best() == {"fid": 40.0, "kid": 0.1, "epoch": 2, "checkpoint": "epoch_002.pt"}
