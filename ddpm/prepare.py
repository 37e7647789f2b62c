"""Prepare a dataset (issue 36): decode, convert, resize and crop every image of a source once,
with the image folders' own transform (data.load_image), into a prepared dataset folder
(ddpm.prepared), in parallel over processes and resumable.

Sources: an image folder (PNG/JPEG files under it, as data.dataset=folder reads them), CIFAR-10's
python batches (a `cifar-10-batches-py` folder or the folder holding it), and a Hugging Face
dataset on disk (`save_to_disk`'s folder, or a folder of parquet files), its image column named
or found.

The work is split into shards of `shard_size` images, each written by one process as one file
with a record of it beside (`<shard>.json`: its count, SHA-256, the files it skipped).
`preparing.json`, written before any shard, marks the folder as a preparation and records
what it prepares (the source's fingerprint and the transform): a re-run of a killed
preparation keeps the shards it finds whole and writes the rest; a re-run with nothing
changed finds `prepared.json` with the same record and does nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from ddpm.cifar10 import CIFAR10_DIR, CIFAR10_TRAIN_FILES
from ddpm.config import Config
from ddpm.files import atomic_write, claim_folder, remove_partial_writes
from ddpm.image_folders import load_image, scan_folder
from ddpm.prepared import (
    MANIFEST,
    PreparedError,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)

__all__ = ["PLAN", "Source", "find_source", "folder_source", "prepare", "prepare_folder",
           "prepared_cache", "reading_prepared"]  # fmt: skip

log = logging.getLogger(__name__)

PLAN = "preparing.json"  # written first: the folder is a preparation of this source
LOCK = "lock"  # held while a process prepares into the folder
SHARD_SIZE = 4096  # images per shard: 12 MiB at 32 px, 200 MiB at 128 px
TRANSFORM_VERSION = 1  # data.load_image's; a change re-prepares


@dataclass(frozen=True)
class Source:
    """What to prepare from: its kind, where it is, its images (a file path, a CIFAR-10 row
    or a dataset row each), a fingerprint that changes when any of them does."""

    kind: str  # "folder" | "cifar10" | "hf"
    path: Path
    items: Sequence[Any]
    fingerprint: str
    column: str | None = None  # hf: the image column
    options: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The source as prepared.json records it."""
        named = {"column": self.column} if self.column else {}
        return {"kind": self.kind, "path": str(self.path.resolve()), "images": len(self.items),
                "fingerprint": self.fingerprint, **named}  # fmt: skip


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _stat_key(path: Path, root: Path) -> str:
    st = path.stat()
    return f"{path.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}"


def find_source(path: Path | str, column: str | None = None) -> Source:
    """The source at path: CIFAR-10's batches, a Hugging Face dataset on disk, or else an image
    folder; its fingerprint from its files' names, sizes and modification times.

    Raises:
        PreparedError: naming the path if it does not exist or holds no images.
    """
    path = Path(path)
    if not path.exists():
        raise PreparedError(f"--source {path}: no such folder")
    if not path.is_dir():
        raise PreparedError(f"--source {path}: a file; give the folder that holds the images")
    cifar = path if path.name == CIFAR10_DIR else path / CIFAR10_DIR
    if all((cifar / name).is_file() for name in CIFAR10_TRAIN_FILES):
        files = [cifar / name for name in CIFAR10_TRAIN_FILES]
        return Source("cifar10", cifar, [(f.name, None) for f in files],
                      _digest(_stat_key(f, cifar) for f in files))  # fmt: skip
    if any((path / name).is_file() for name in ("state.json", "dataset_dict.json")) or any(
        path.glob("*.parquet")
    ):
        return _hf_source(path, column)
    return folder_source(path)


def folder_source(path: Path | str, setting: str = "--source") -> Source:
    """The PNG/JPEG images under path (recursively, as data.ImageFolderDataset lists them);
    the fingerprint from their names, sizes and modification times (no image is opened).

    Raises:
        PreparedError: naming the setting and the path if it holds no images.
    """
    path = Path(path)
    images, others = scan_folder(path)
    if not images:
        raise PreparedError(f"{setting} {path}: no PNG or JPEG images in it ({len(others)} "
                            "other files)")  # fmt: skip
    shown = [f for f in others if not f.hidden]
    if shown:
        log.warning("%s: %d files that are not PNG or JPEG images left out", path, len(shown))
    fingerprint = _digest(f"{f.name}:{f.size}:{f.mtime_ns}" for f in images)
    return Source("folder", path, [f.name for f in images], fingerprint)


def prepared_cache(folder: Path | str, cache: Path | str, image_size: int, channels: int) -> Path:
    """Where data.prepare=auto keeps the image folder's prepared copy: a folder under cache
    named by the folder's absolute path and the transform (not by its contents: a changed
    folder is prepared again into the same place, so old copies do not pile up)."""
    key = _digest([str(Path(folder).resolve()), str(image_size), str(channels),
                   str(TRANSFORM_VERSION)])  # fmt: skip
    return Path(cache) / key[:16]


def reading_prepared(config: Config, folder: Path | str) -> Config:
    """config with its image folder replaced by its prepared copy at folder (data.prepare=auto):
    the same images, read as data.dataset=prepared."""
    data = dataclasses.replace(config.data, dataset="prepared", folder=Path(folder))
    return dataclasses.replace(config, data=data)


def prepare_folder(
    folder: Path | str,
    cache: Path | str,
    image_size: int,
    channels: int = 3,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """data.prepare=auto: the image folder prepared once into prepared_cache(...), then reused
    while its fingerprint (its images' names, sizes and modification times) stays the same;
    a process that finds another preparing it waits for it, then reuses its work.

    Returns:
        the prepared dataset's folder.
    """
    out = prepared_cache(folder, cache, image_size, channels)
    source = folder_source(folder, "data.folder")
    prepare(source, out, image_size, channels, workers, progress=progress, wait=True)
    return out


def _hf_dataset(path: Path):
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of the project
        raise PreparedError(f"--source {path}: reading it needs `pip install datasets`") from None
    if any(path.glob("*.parquet")):
        files = sorted(str(p) for p in path.glob("*.parquet"))
        return datasets.load_dataset("parquet", data_files=files, split="train")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, its own
        raise PreparedError(f"--source {path}: not a dataset datasets can load ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise PreparedError(f"--source {path}: a dataset of splits {sorted(loaded)}, none "
                                "named train; give the split's folder")  # fmt: skip
        loaded = loaded["train"]
    return loaded


def _hf_source(path: Path, column: str | None) -> Source:
    import datasets

    ds = _hf_dataset(path)
    images = [name for name, f in ds.features.items() if isinstance(f, datasets.Image)]
    if column is None:
        if not images:
            raise PreparedError(f"--source {path}: no image column among {list(ds.features)}; "
                                "name the column with --column")  # fmt: skip
        column = images[0]
    elif column not in ds.features:
        raise PreparedError(f"--column {column}: not a column of {path} "
                            f"({', '.join(ds.features)})")  # fmt: skip
    if len(ds) == 0:
        raise PreparedError(f"--source {path}: the dataset holds no rows")
    return Source("hf", path, range(len(ds)), ds._fingerprint, column)


# ---- one shard, in a worker process ---------------------------------------------------------


def _open_item(source: Source, item: Any, cache: dict[str, Any]) -> tuple[str, Any]:
    """(name for messages, a path or a binary file) of one image of the source."""
    if source.kind == "folder":
        return item, source.path / item
    if source.kind == "hf":
        key = f"{source.path.resolve()}\0{source.fingerprint}\0{source.column}"
        if key not in cache:
            import datasets

            cache.clear()
            cache[key] = _hf_dataset(source.path).cast_column(
                source.column, datasets.Image(decode=False)
            )
        value = cache[key][int(item)][source.column]
        if value.get("bytes"):
            return f"row {item}", io.BytesIO(value["bytes"])
        return f"row {item} ({value.get('path')})", value.get("path")
    raise ValueError(source.kind)


def _decode(
    source: Source, items: Sequence[Any], size: int, mode: str
) -> tuple[list[np.ndarray], list[str]]:
    """Decode and transform `items` (a CIFAR-10 batch file's rows, for one): their (C, size,
    size) uint8 images, in order, and the names of those that could not be read."""
    import torch

    from ddpm.image_folders import _readable_image

    torch.set_num_threads(1)
    channels = 3 if mode == "RGB" else 1
    images: list[np.ndarray] = []
    skipped: list[str] = []
    if source.kind == "cifar10":
        from PIL import Image

        from ddpm.cifar10 import read_cifar10_batch

        (batch_file, _), *_ = items  # a CIFAR-10 shard is one batch file
        for row in read_cifar10_batch(source.path / batch_file).numpy():
            if size == 32 and channels == 3:
                images.append(row)
                continue
            picture = Image.fromarray(np.ascontiguousarray(row.transpose(1, 2, 0)))
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            buffer.seek(0)
            images.append(load_image(buffer, size, mode).numpy())
        return images, skipped
    for item in items:
        name, file = _open_item(source, item, _WORKER_CACHE)
        try:
            if source.kind == "folder" and not _readable_image(file):
                raise ValueError("PIL cannot read it, or it is cut short")
            images.append(load_image(file, size, mode).numpy())
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, its own
            skipped.append(f"{name} ({' '.join(str(err).split())[:120]})")
    return images, skipped


_WORKER_CACHE: dict[str, Any] = {}  # a worker's opened Hugging Face dataset


def _write_shard_and_record(
    out: Path, index: int, count: int, images: list[np.ndarray], skipped: list[str]
) -> dict[str, Any]:
    """Write shard `index` of `count` (if it kept any image), then its record."""
    name = shard_name(index, count)
    record: dict[str, Any] = {"file": name, "count": len(images), "skipped": skipped}
    if images:
        record["sha256"] = write_shard(out / name, np.stack(images))
    text = json.dumps(record) + "\n"
    atomic_write(out / f"{name}.json", lambda f: f.write(text.encode()))
    return record


# ---- the whole preparation ------------------------------------------------------------------


def _plan(source: Source, shard_size: int) -> list[Sequence[Any]]:
    if source.kind == "cifar10":  # one shard per batch file
        return [[item] for item in source.items]
    n = len(source.items)
    return [source.items[i : i + shard_size] for i in range(0, n, shard_size)]


def _chunks(source: Source, shard: Sequence[Any], workers: int) -> list[tuple[int, int]]:
    """(start, stop) pieces of a shard's items for the workers: about 4 per worker, 8 to 256
    items each (a CIFAR-10 batch file is one piece)."""
    n = len(shard)
    if source.kind == "cifar10":
        return [(0, n)]
    size = max(8, min(256, -(-n // (4 * workers))))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _done(out: Path, name: str) -> dict[str, Any] | None:
    """A shard's record, if it and its file are whole (a killed write leaves neither)."""
    try:
        record = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("count") and not (out / name).is_file():
        return None
    return record


def prepare(
    source: Source,
    out: Path | str,
    image_size: int,
    channels: int = 3,
    workers: int | None = None,
    shard_size: int = SHARD_SIZE,
    progress: Callable[[int, int], None] | None = None,
    wait: bool = False,
) -> dict[str, Any]:
    """Prepare `source` into `out` (see the module's docstring); returns its manifest.

    Args:
        workers: processes decoding shards at once (default: the CPUs this process may use).
        progress: called with (images done, images in all) as shards finish.
        wait: wait for another process preparing into `out` (else: PreparedError).

    Raises:
        NotOurs: naming `out` if it holds files that are not a preparation's; untouched.
        PreparedError: if no image of the source could be decoded.
    """
    out = Path(out)
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise PreparedError(f"--channels {channels}: 1 (grayscale) or 3 (RGB)")
    transform = {"image_size": image_size, "channels": channels, "resize": "bicubic",
                 "crop": "center", "version": TRANSFORM_VERSION}  # fmt: skip
    what = {"source": source.record(), "transform": transform}
    mine = claim_folder(out, PLAN, "a prepared dataset", (LOCK,), "--out")
    if mine and _same(out / MANIFEST, what):
        log.info("%s is already prepared from %s: nothing to do", out, source.path)
        return read_manifest(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        raise PreparedError(f"{out} is being prepared by another process; wait for it, or "
                            "choose another --out") from None  # fmt: skip
    try:
        if _same(out / MANIFEST, what):  # another process prepared it while this one waited
            return read_manifest(out)
        return _prepare_locked(source, out, what, mode, workers, shard_size, progress)
    finally:
        lock.release()


def _prepare_locked(
    source: Source,
    out: Path,
    what: dict[str, Any],
    mode: str,
    workers: int | None,
    shard_size: int,
    progress: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    remove_partial_writes(out)  # a killed write's, now the lock is ours
    if not _same(out / PLAN, what):  # another source or transform: start again
        _remove_preparation(out)
    image_size = what["transform"]["image_size"]
    plan = _plan(source, shard_size)
    text = json.dumps({**what, "shards": len(plan)}, indent=2) + "\n"
    atomic_write(out / PLAN, lambda f: f.write(text.encode()))
    records: dict[int, dict[str, Any]] = {}
    for i in range(len(plan)):
        if (record := _done(out, shard_name(i, len(plan)))) is not None:
            records[i] = record
    total = len(source.items) if source.kind != "cifar10" else None
    done = sum(len(plan[i]) for i in records) if total else len(records)
    todo = [i for i in range(len(plan)) if i not in records]
    if records:
        log.info("%s: %d of %d shards already prepared; preparing the rest", out,
                 len(records), len(plan))  # fmt: skip
    workers = max(1, workers or len(os.sched_getaffinity(0)))
    # Work in chunks of a shard, so that every worker decodes even when the shards are fewer
    # than the workers; the shard is written here once its chunks are all back.
    chunks = [(i, a, b) for i in todo for a, b in _chunks(source, plan[i], workers)]
    workers = min(workers, len(chunks) or 1)
    parts: dict[int, dict[int, tuple[list[np.ndarray], list[str]]]] = {i: {} for i in todo}
    bare = dataclasses.replace(source, items=())  # each chunk carries its own items

    def finished(i: int, start: int, stop: int, part: tuple[list[np.ndarray], list[str]]) -> None:
        nonlocal done
        parts[i][start] = part
        done += (stop - start) if total else 1
        if sum(len(p[0]) + len(p[1]) for p in parts[i].values()) == len(plan[i]) or not total:
            pieces = parts.pop(i)
            ordered = [pieces[a] for a in sorted(pieces)]
            images = [image for p in ordered for image in p[0]]
            skipped = [name for p in ordered for name in p[1]]
            records[i] = _write_shard_and_record(out, i, len(plan), images, skipped)
        if progress is not None:
            progress(done, total or len(plan))

    if workers == 1:  # here, without starting a process
        for i, a, b in chunks:
            finished(i, a, b, _decode(bare, plan[i][a:b], image_size, mode))
    elif chunks:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_decode, bare, plan[i][a:b], image_size, mode): (i, a, b)
                       for i, a, b in chunks}  # fmt: skip
            for future in as_completed(futures):
                finished(*futures[future], future.result())
    return _finish(source, out, what, [records[i] for i in range(len(plan))])


def _finish(
    source: Source, out: Path, what: dict[str, Any], shards: list[dict[str, Any]]
) -> dict[str, Any]:
    """Name the skipped images in one warning, write the manifest of the shards (their
    records, in order), then remove the records and the empty shards."""
    skipped = [name for r in shards for name in r["skipped"]]
    if skipped:
        shown = "; ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3
                                          else "")  # fmt: skip
        log.warning("%s: skipped %d unreadable images: %s", source.path, len(skipped), shown)
    kept = [{k: r[k] for k in ("file", "count", "sha256")} for r in shards if r["count"]]
    if not kept:
        raise PreparedError(f"--source {source.path}: none of its images could be decoded")
    c, size = what["transform"]["channels"], what["transform"]["image_size"]
    write_manifest(out, (c, size, size), kept, skipped=len(skipped), **what)
    for r in shards:
        (out / f"{r['file']}.json").unlink(missing_ok=True)
        if not r["count"]:
            (out / r["file"]).unlink(missing_ok=True)
    return read_manifest(out)


def _same(path: Path, what: dict[str, Any]) -> bool:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return saved.get("source") == what["source"] and saved.get("transform") == what["transform"]


def _remove_preparation(out: Path) -> None:
    """Remove what a preparation wrote in out (its shards, their records, the manifest and the
    plan), nothing else."""
    for path in out.iterdir():
        ours = path.name in (MANIFEST, PLAN) or (
            path.name.startswith("data-") and path.name.endswith((".arrow", ".arrow.json"))
        )
        if ours and path.is_file():
            path.unlink()
