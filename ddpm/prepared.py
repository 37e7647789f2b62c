"""Prepared datasets (issue 36): images decoded, converted, resized and cropped once, stored
as uint8 in Arrow files and read memory-mapped, as numpy views of the files' pages, so that a
batch at any indices is one gather at memory speed whatever the dataset's size.

A prepared dataset is a folder:

    data-00000-of-00004.arrow ...   Arrow IPC stream files (the layout Hugging Face `datasets`
                                    save_to_disk writes), each one record batch of a column
                                    `image`: binary values of C*H*W bytes, (C, H, W) uint8
    prepared.json                   what the folder holds: the image shape, each shard's image
                                    count and SHA-256, and what the caller records (the
                                    source's fingerprint, the transform); written last

The format was chosen by measurement (benchmarks/data_formats/results.md): read through
numpy views of the mapped buffers, random batches of 50,000 32-px images came at 0.65x a raw
np.memmap's speed (760,000 img/s on one loaded core), where `datasets`' own batch access gave
0.13x and MosaicML Streaming's and LitData's per-item access 0.014x and 0.017x. Each shard is
written atomically (files.atomic_write), so a killed preparation leaves whole shards, which a
re-run keeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from ddpm.errors import UserError
from ddpm.files import atomic_write, claim_folder, remove_partial_writes

__all__ = ["MANIFEST", "PreparedError", "PreparedImages", "fetch", "is_url", "shard_name",
           "write_manifest", "write_shard"]  # fmt: skip

MANIFEST = "prepared.json"
FORMAT = "ddpm-prepared-1"
COLUMN = "image"


class PreparedError(UserError, ValueError):
    """A prepared dataset that cannot be read; the message names the folder or file."""


def shard_name(index: int, count: int) -> str:
    """data-00003-of-00010.arrow: shard `index` of `count`, as `datasets` names them."""
    return f"data-{index:05d}-of-{count:05d}.arrow"


def write_shard(path: Path, images: np.ndarray) -> str:
    """Write (n, C, H, W) uint8 images as one Arrow stream file of one record batch, atomically;
    returns its SHA-256."""
    import pyarrow as pa

    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected (n, C, H, W) uint8 images, n >= 1; got {images.shape}")
    size = int(np.prod(images.shape[1:]))
    offsets = pa.py_buffer(np.arange(len(images) + 1, dtype=np.int32) * size)
    values = pa.Array.from_buffers(pa.binary(), len(images),
                                   [None, offsets, pa.py_buffer(images)])  # fmt: skip
    batch = pa.record_batch([values], names=[COLUMN])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    data = sink.getvalue()
    atomic_write(Path(path), lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


def write_manifest(
    folder: Path, shape: Sequence[int], shards: Sequence[Mapping[str, Any]], **record: Any
) -> Path:
    """Write prepared.json: the image shape (C, H, W), the shards in order (each its file,
    count and sha256) and the caller's record (source, fingerprint, transform)."""
    manifest = {
        "format": FORMAT,
        "shape": [int(s) for s in shape],
        "count": sum(int(s["count"]) for s in shards),
        "shards": [dict(s) for s in shards],
        **record,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    return atomic_write(Path(folder) / MANIFEST, lambda f: f.write(text.encode()))


def read_manifest(folder: Path) -> dict[str, Any]:
    """prepared.json of a prepared dataset folder.

    Raises:
        PreparedError: naming the folder if it holds no (readable, complete) manifest.
    """
    path = Path(folder) / MANIFEST
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise PreparedError(
            f"{folder}: not a prepared dataset (no {MANIFEST}; make one with ddpm-prepare)"
        ) from None
    except OSError as err:
        raise PreparedError(f"{path}: unreadable ({err}); prepare the dataset again") from None
    return _parse_manifest(text, str(path))


def _parse_manifest(text: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreparedError(f"{where}: unreadable ({err}); prepare the dataset again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PreparedError(f"{where}: not a manifest this version reads (format {FORMAT})")
    return manifest


# ---- a prepared dataset in an object store --------------------------------------------------

URL_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss")  # pyarrow.fs's
REMOTE = "remote.json"  # a local copy's record of its URL: the folder is the product's
CHUNK = 8 << 20  # bytes read at once


def is_url(value: object) -> bool:
    """Whether a data.folder value is a URL (scheme://...) rather than a local path."""
    return isinstance(value, str) and "://" in value


def fetch(url: str, out: Path) -> Path:
    """The prepared dataset at url (s3://bucket/path, gs://bucket/path, file:///path, or any
    URL pyarrow.fs reads, credentials from the environment as the store's SDK reads them)
    copied into the local folder out, then read memory-mapped like any prepared dataset.

    Each shard is streamed to disk in CHUNK pieces (memory stays bounded whatever its size),
    its SHA-256 checked against the manifest and renamed into place whole; the manifest is
    copied last. A copy cut short keeps its whole shards and fetches the rest; a copy whose
    manifest equals the store's reads nothing more than the manifest; a dataset prepared
    again at the URL replaces the shards that changed. A process finding another fetching
    into out waits for it.

    Raises:
        PreparedError: naming the URL or the shard if it holds no prepared dataset or a shard
            is not the manifest's.
        OSError: if the store cannot be reached (it may pass: the caller may retry).
    """
    from pyarrow import fs

    try:
        store, root = fs.FileSystem.from_uri(url)
    except (ValueError, TypeError) as err:  # pyarrow: unrecognised scheme or URI
        raise PreparedError(f"data.folder {url}: not a URL pyarrow.fs reads ({err})") from None
    root = root.rstrip("/")
    try:
        with store.open_input_stream(f"{root}/{MANIFEST}") as f:
            text = f.read()
    except FileNotFoundError:
        raise PreparedError(f"data.folder {url}: not a prepared dataset (no {MANIFEST} "
                            "there)") from None  # fmt: skip
    manifest = _parse_manifest(text, f"{url}/{MANIFEST}")
    claim_folder(out, REMOTE, "a prepared dataset's local copy", ("lock",), "data.folder")
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(out / "lock"):
        if (out / MANIFEST).is_file() and (out / MANIFEST).read_bytes() == text:
            return out
        remove_partial_writes(out)
        record = (json.dumps({"url": url}) + "\n").encode()
        if not (out / REMOTE).is_file() or (out / REMOTE).read_bytes() != record:
            atomic_write(out / REMOTE, lambda f: f.write(record))
        (out / MANIFEST).unlink(missing_ok=True)  # the old copy is not whole from here on
        wanted = {entry["file"]: entry["sha256"] for entry in manifest["shards"]}
        for stale in out.glob("data-*.arrow"):
            if stale.name not in wanted:
                stale.unlink()
        for name, sha in wanted.items():
            path = out / name
            if path.is_file() and _sha256(path) == sha:
                continue
            _copy_checked(store, f"{root}/{name}", path, sha, f"{url}/{name}")
        atomic_write(out / MANIFEST, lambda f: f.write(text))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_checked(store: Any, source: str, path: Path, sha: str, where: str) -> None:
    """Stream source to path (atomically) if its SHA-256 is sha; else PreparedError."""

    class _Mismatch(Exception):
        pass

    def write(f: Any) -> None:
        h = hashlib.sha256()
        with store.open_input_stream(source) as stream:
            while chunk := stream.read(CHUNK):
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != sha:
            raise _Mismatch

    try:
        atomic_write(path, write)
    except FileNotFoundError:
        raise PreparedError(f"{where}: missing, though the manifest names it; prepare the "
                            "dataset again") from None  # fmt: skip
    except _Mismatch:
        raise PreparedError(f"{where}: damaged (its SHA-256 is not the manifest's); prepare "
                            "the dataset again") from None  # fmt: skip


@dataclass
class _Shard:
    start: int  # global index of its first image
    images: np.ndarray | None  # (n, C, H, W) uint8, a view of the mapped file; None: read
    fd: int = -1  # with images None: the open file, read by pread
    offset: int = 0  # byte offset of its first image in the file


class PreparedImages:
    """A prepared dataset's images: (N, C, H, W) uint8 read by index, from memory-mapped files
    or, for data larger than memory, by pread.

    Args:
        folder: the prepared dataset's folder.
        random_access: read each gathered image with pread instead of mapping the files: the
            pages read then sit in the page cache, which the kernel (and a cgroup's limit)
            reclaims at will, where mapped pages would stay in this process's memory and,
            under a memory limit, get it killed (benchmarks/data.py measured both). For data
            larger than memory; mapped (read-ahead, no system call per image) for the rest.
        verify: check each shard's SHA-256 against the manifest (reads every byte once).

    Raises:
        PreparedError: naming the folder or the shard that is missing, damaged or not what
            the manifest says.
    """

    def __init__(self, folder: Path, random_access: bool = False, verify: bool = False) -> None:
        import pyarrow as pa

        self.folder, self.random_access = Path(folder), random_access
        self.manifest = read_manifest(self.folder)
        self.shape = tuple(self.manifest["shape"])
        size = self.size = int(np.prod(self.shape))
        self._shards: list[_Shard] = []
        self._maps: list[mmap.mmap] = []
        start = 0
        for entry in self.manifest["shards"]:
            path = self.folder / entry["file"]
            try:
                with open(path, "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as err:  # ValueError: an empty file cannot be mapped
                raise PreparedError(f"{path}: cannot be read ({err}); prepare again") from None
            self._maps.append(mapped)
            if verify and hashlib.sha256(mapped).hexdigest() != entry["sha256"]:
                raise PreparedError(f"{path}: damaged (its SHA-256 is not the manifest's); "
                                    "prepare the dataset again")  # fmt: skip
            try:
                whole = pa.py_buffer(mapped)
                batches = list(pa.ipc.open_stream(whole))
            except (pa.ArrowException, OSError) as err:
                raise PreparedError(f"{path}: not an Arrow stream ({err}); prepare again") from None
            count = int(entry["count"])
            if len(batches) != 1 or batches[0].num_rows != count:
                raise PreparedError(f"{path}: holds {sum(b.num_rows for b in batches)} images "
                                    f"where the manifest says {count}")  # fmt: skip
            column = batches[0].column(COLUMN)
            offsets = np.frombuffer(column.buffers()[1], dtype=np.int32, count=count + 1)
            if offsets[0] != 0 or not np.array_equal(np.diff(offsets), np.full(count, size)):
                raise PreparedError(f"{path}: its images are not {self.shape} uint8 each")
            if random_access:  # the images' place in the file; the map goes
                offset = column.buffers()[2].address - whole.address
                del batches, column, offsets, whole
                self._maps.pop().close()
                self._shards.append(_Shard(start, None, os.open(path, os.O_RDONLY), offset))
            else:
                values = np.frombuffer(column.buffers()[2], dtype=np.uint8, count=count * size)
                self._shards.append(_Shard(start, values.reshape(count, *self.shape)))
            start += count
        self._starts = np.array([s.start for s in self._shards], dtype=np.int64)
        self.count = start

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a DataLoader worker: the folder, opened again there (files, maps)."""
        return {"folder": self.folder, "random_access": self.random_access}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["random_access"])  # type: ignore[misc]

    def gather(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """The images at `indices` (any order, repeats allowed): (B, C, H, W) uint8, a copy."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.count):
            raise IndexError(
                f"indices must be in [0, {self.count}), got {index.min()}..{index.max()}"
            )
        out = np.empty((index.size, *self.shape), dtype=np.uint8)
        if len(self._shards) == 1 and self._shards[0].images is not None:
            np.take(self._shards[0].images, index, axis=0, out=out)
            return torch.from_numpy(out)
        which = np.searchsorted(self._starts, index, side="right") - 1
        for s in np.unique(which):
            rows = np.nonzero(which == s)[0]
            shard = self._shards[s]
            if shard.images is not None:
                out[rows] = shard.images[index[rows] - shard.start]
                continue
            flat = out.reshape(index.size, self.size)
            for row, i in zip(rows.tolist(), (index[rows] - shard.start).tolist(), strict=True):
                if os.preadv(shard.fd, [flat[row]], shard.offset + i * self.size) != self.size:
                    raise PreparedError(f"{self.folder}: a shard is shorter than its manifest "
                                        "says; prepare the dataset again")  # fmt: skip
        return torch.from_numpy(out)

    def slice(self, start: int, stop: int) -> torch.Tensor:
        """Images start .. stop - 1: (stop - start, C, H, W) uint8, a copy."""
        return self.gather(np.arange(start, stop))

    def load(self) -> torch.Tensor:
        """Every image: (N, C, H, W) uint8 in memory (for a dataset that fits)."""
        if any(s.images is None for s in self._shards):
            return self.slice(0, self.count)
        return torch.from_numpy(np.concatenate([s.images for s in self._shards]))

    def close(self) -> None:
        """Release the mapped files (views gathered before stay valid: they are copies)."""
        for shard in self._shards:
            if shard.fd >= 0:
                os.close(shard.fd)
        self._shards.clear()
        for mapped in self._maps:
            with contextlib.suppress(BufferError):  # a view is still alive; it goes with that
                mapped.close()
        self._maps.clear()
