"""The sources a dataset is prepared from (ddpm.prepare): an image folder (PNG/JPEG files under
it, as data.dataset=folder reads them), CIFAR-10's python batches (a `cifar-10-batches-py` folder
or the folder holding it), and a Hugging Face dataset on disk (`save_to_disk`'s folder, or a
folder of parquet files), its image column named or found.

Each is found at a path (find_source) with a fingerprint that changes when any of its images
does, and its images are decoded with the image folders' own transform (data.load_image), a
chunk at a time in a worker process (decode).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.cifar10 import CIFAR10_DIR, CIFAR10_TRAIN_FILES
from ddpm.image_folders import load_image, scan_folder
from ddpm.prepared import PreparedError

__all__ = ["Source", "decode", "digest", "find_source", "folder_source"]

log = logging.getLogger(__name__)


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


def digest(parts: Iterable[str]) -> str:
    """The SHA-256 (hex) of `parts`, each ended by a NUL byte: a fingerprint of them."""
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
                      digest(_stat_key(f, cifar) for f in files))  # fmt: skip
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
    fingerprint = digest(f"{f.name}:{f.size}:{f.mtime_ns}" for f in images)
    return Source("folder", path, [f.name for f in images], fingerprint)


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


# ---- decoding, in a worker process ----------------------------------------------------------


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


def decode(
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
