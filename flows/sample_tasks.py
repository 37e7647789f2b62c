"""The Prefect tasks of sample_flow: each a thin wrapper over one call into the core.

Only generate-images and evaluate-images touch the accelerator; load-model and write-npz run on
the CPU. The model is carried between tasks, never hashed or persisted (NO_CACHE).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from ddpm.config import Config
from ddpm.datasets import load_dataset
from ddpm.evaluation import compute_metrics
from ddpm.files import atomic_write
from ddpm.generate import TrainedModel, generate, load_trained_model, network_calls
from ddpm.images import ImageFiles
from flows.download import data_reference_key
from flows.progress import ProgressBar
from flows.shutdown import StopRequest

PROGRESS_KEY = "generation-progress"


class SamplingStopped(Exception):
    """A stop request arrived while sampling: what was being drawn is dropped."""


def stop_check(stop: StopRequest, bar: ProgressBar | None = None) -> Callable[[], None]:
    """A sampler's progress callback: advances the bar, and raises SamplingStopped once a stop
    is requested (so a stop never waits for a whole batch of sampler steps)."""

    def progress() -> None:
        if bar is not None:
            bar.advance()
        if stop():
            raise SamplingStopped

    return progress


def sampler_steps(config: Config) -> int:
    """Network evaluations per sampled batch: the sampler's steps (all T for ddpm)."""
    return network_calls(config.diffusion, config.sample)


@task(name="load-model", cache_policy=NO_CACHE, persist_result=False)
def load_model_task(path: str, ema: bool) -> TrainedModel:
    """The network of a run folder's newest valid checkpoint, or of a checkpoint file, on the
    CPU (EMA weights unless ema is off)."""
    trained = load_trained_model(Path(path), use_ema=ema)
    get_run_logger().info(
        "%s: epoch %d, step %d, %s weights",
        trained.checkpoint,
        trained.epoch,
        trained.global_step,
        "EMA" if trained.ema else "trained",
    )
    return trained


@task(name="generate-images", cache_policy=NO_CACHE, persist_result=False)
def generate_images_task(
    trained: TrainedModel,
    config: Config,
    files: ImageFiles,
    seed: int,
    batch_size: int,
    stop: StopRequest,
) -> int:
    """Draw the images that have no file yet, in aligned batches on train.device, and write
    each batch's files; returns how many were written. A stop request ends it between sampler
    steps (the batch in hand is dropped; a re-run draws it again)."""
    logger = get_run_logger()
    pending = files.pending_batches(batch_size)
    missing = files.missing()
    sizes = sorted({len(indices) for indices in pending}, reverse=True)
    logger.info(
        "%d of %d images to draw into %s (%d batch%s of %s, %s %d steps, %s, %s)",
        missing,
        files.num,
        files.folder,
        len(pending),
        "" if len(pending) == 1 else "es",
        " or ".join(map(str, sizes)) or "0",
        config.sample.sampler,
        sampler_steps(config),
        config.train.device,
        config.train.precision,
    )
    model = trained.diffusion.to(config.train.device)
    done, written = files.num - missing, 0
    artifact = create_progress_artifact(
        100.0 * done / files.num, key=PROGRESS_KEY, description=f"images written of {files.num}"
    )
    with ProgressBar("images", files.num, done) as bar:
        for indices in pending:
            try:
                images = generate(
                    model, indices, trained.image_shape, config.sample, seed,
                    config.train.precision, stop_check(stop),
                )  # fmt: skip
            except SamplingStopped:
                logger.warning("%s: stopped after %d images", stop.reason, done)
                break
            new = files.write(indices, images)
            done, written = done + new, written + new
            bar.advance(new)
            update_progress_artifact(artifact, 100.0 * done / files.num)
            logger.info("%d/%d images", done, files.num)
    return written


@task(name="write-npz", cache_policy=NO_CACHE, persist_result=False)
def write_npz_task(files: ImageFiles) -> str:
    """All the images in one uint8 NHWC .npz (arr_0), for improved-diffusion's and EDM's FID
    tools."""
    path = files.write_npz()
    get_run_logger().info("wrote %s", path)
    return str(path)


@task(name="evaluate-images", cache_policy=NO_CACHE, persist_result=False)
def evaluate_images_task(files: ImageFiles, config: Config, data_path: str) -> dict[str, float]:
    """FID/KID of the image files against the run's training images (statistics cached);
    writes them to DIR/metrics.json."""
    ev = config.eval
    metrics = compute_metrics(
        files, load_dataset(config, Path(data_path)),
        reference_key=data_reference_key(config, data_path), cache_dir=ev.cache_dir,
        metrics=ev.metrics, weights=ev.weights, batch_size=ev.batch_size,
        device=config.train.device,
    )  # fmt: skip
    record = {"num": files.num, **metrics}
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(files.folder / "metrics.json", lambda f: f.write(text.encode()))
    line = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    get_run_logger().info("%d images: %s", files.num, line)
    return metrics
