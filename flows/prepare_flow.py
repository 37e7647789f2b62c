"""prepare_flow: a dataset decoded, converted, resized and cropped once (ddpm.prepare).

    ddpm-prepare --source SOURCE --out OUT --image-size N [--channels C] [--column NAME]

turns an image folder, CIFAR-10's python batches or a Hugging Face dataset on disk into a
prepared dataset that `--data.dataset prepared --data.folder OUT` trains from at memory speed.
Parallel over the CPUs (--workers), with a progress bar; a killed preparation finishes on
re-run, and a re-run with nothing changed does nothing.
"""

if __name__ == "__main__":
    import sys

    from flows.cli import prepare_main

    sys.exit(prepare_main())

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ddpm.prepare import SHARD_SIZE, prepare, prepared_cache
from ddpm.sources import Source, find_source, folder_source
from flows.progress import ProgressBar

__all__ = ["prepare_flow", "prepare_folder_task"]


@task(name="prepare-dataset", cache_policy=NO_CACHE)
def prepare_task(
    source: str,
    out: str,
    image_size: int,
    channels: int,
    column: str | None,
    workers: int | None,
    shard_size: int,
) -> dict[str, Any]:
    """Prepare source into out; returns where, how many images and how many were skipped."""
    found = find_source(source, column)
    manifest = _prepare(found, out, image_size, channels, workers, shard_size)
    summary = {"out": out, "images": manifest["count"], "skipped": manifest.get("skipped", 0),
               "shape": manifest["shape"], "source": found.kind}  # fmt: skip
    get_run_logger().info("%s", summary)
    return summary


@task(name="prepare-folder", cache_policy=NO_CACHE)
def prepare_folder_task(folder: str, cache: str, image_size: int, channels: int) -> str:
    """data.prepare=auto: the image folder prepared on first use into a folder under cache
    (ddpm.prepare.prepare_folder), over every CPU; a later run with the folder unchanged
    finds it prepared and does no work. Returns the prepared dataset's folder."""
    found = folder_source(folder, "data.folder")
    out = prepared_cache(folder, cache, image_size, channels)
    manifest = _prepare(found, out, image_size, channels, None, SHARD_SIZE, wait=True)
    get_run_logger().info("training from %s: %d images of %s prepared from %s", out,
                          manifest["count"], manifest["shape"], folder)  # fmt: skip
    return str(out)


def _prepare(found: Source, out: str | Path, *args: Any, wait: bool = False) -> dict[str, Any]:
    """ddpm.prepare.prepare with a progress bar over the source's images."""
    with ProgressBar(f"preparing {found.kind} {found.path}", len(found.items)) as bar:

        def progress(done: int, _: int) -> None:
            bar.advance(done - bar.completed)

        return prepare(found, out, *args, progress=progress, wait=wait)


@flow(name="prepare-flow")
def prepare_flow(
    source: str,
    out: str,
    image_size: int = 32,
    channels: int = 3,
    column: str | None = None,
    workers: int | None = None,
    shard_size: int = SHARD_SIZE,
) -> dict[str, Any]:
    """Prepare a dataset (see the module's docstring).

    Args:
        source: an image folder, a folder holding CIFAR-10's python batches, or a Hugging Face
            dataset on disk (save_to_disk's folder, or a folder of parquet files).
        out: the prepared dataset's folder: new, empty, or an earlier preparation.
        image_size: side of the square images in px; channels: 3 (RGB) or 1 (grayscale).
        column: a Hugging Face dataset's image column (default: its first Image column).
        workers: processes decoding at once (default: every CPU this process may use).
        shard_size: images per file.
    """
    return prepare_task(str(Path(source).resolve()), str(Path(out).resolve()), image_size,
                        channels, column, workers, shard_size)  # fmt: skip
