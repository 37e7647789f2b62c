"""The Prefect tasks of train_flow: each a thin wrapper over one call into ddpm.pipeline.

Only train-epoch and sample-and-log touch the accelerator. Turns on a shared GPU are taken per
run, not per task (see train_flow.gpu_slot): a run keeps its model on the GPU between tasks.
Tasks that carry a model never hash or persist it (cache_policy=NO_CACHE, no result files).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.tasks import exponential_backoff

from ddpm.checkpoint import CheckpointError
from ddpm.data import epoch_batches, steps_per_epoch
from ddpm.images import save_grid
from ddpm.pipeline import (
    TrainingState,
    build_or_resume,
    draw_samples,
    load_dataset,
    locate_dataset,
    rewind,
    run_epoch,
    save_epoch_checkpoint,
)
from ddpm.training import TrainingDiverged
from flows.tracking import Tracker


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry train-epoch unless it failed for a reason a retry cannot change: divergence
    (train.max_bad_steps) or an incompatible checkpoint."""
    return not isinstance(state.data, (TrainingDiverged, CheckpointError))


@task(
    name="download",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),  # 1 s, 2 s, 4 s
    cache_policy=INPUTS + TASK_SOURCE,
    persist_result=True,
)
def download_task(dataset: str, root: str, url: str, folder: str | None) -> str:
    """Fetch and verify the dataset (or find the image folder); returns its path.

    Cached on its inputs and this source: a second run, even a new flow run, is `Cached` and
    touches no network. Pass absolute paths, so the key does not depend on the working folder.
    """
    return str(locate_dataset(dataset, Path(root), url, Path(folder) if folder else None))


@task(name="build-model", cache_policy=NO_CACHE, persist_result=False)
def build_model_task(
    checkpoint_dir: str, data: dict[str, Any], model: dict[str, Any], batch_size: int, epochs: int
) -> TrainingState:
    """Build the model, optimizer, lr schedule and EMA on the CPU, or resume them from the run's
    newest valid checkpoint. `data` are load_dataset's arguments (the cosine schedule needs the
    run's total steps); `model` are build_training's, less total_steps."""
    logger = get_run_logger()
    total_steps = steps_per_epoch(len(load_dataset(**data)), batch_size) * epochs
    state = build_or_resume(Path(checkpoint_dir), total_steps=total_steps, **model)
    if state.epoch:
        logger.info("resumed at epoch %d, step %d", state.epoch, state.global_step)
    warmup = state.scheduler.lr_lambdas[0].warmup_steps  # as the run started (LRSchedule)
    if warmup < model["warmup_steps"]:
        logger.info(
            "lr warm-up %d steps: optim.warmup_steps (%d) cut to a tenth of the run's steps",
            warmup,
            model["warmup_steps"],
        )
    return state


@task(
    name="train-epoch",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def train_epoch_task(
    state: TrainingState,
    data: dict[str, Any],
    train: dict[str, Any],
    checkpoint_dir: str,
    settings: dict[str, Any],
    epochs: int,
    log_every: int,
    tracker: Tracker,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Train the next epoch on the training device; return its metrics and a CPU snapshot.

    `train` holds run_epoch's settings, checkpoint_every and max_bad_steps included. A retry
    (or any call on a state left mid-epoch) first rewinds to the newest valid checkpoint, so no
    step is counted twice. Every step goes to the tracker, in batches of `log_every` (steps
    never wait for the device in between); the first epoch's first batch, as the model sees
    it, too.
    """
    logger = get_run_logger()
    if state.dirty:
        source = rewind(state, Path(checkpoint_dir))
        logger.warning("rewound to %s (epoch %d, step %d)", source, state.epoch, state.global_step)
    epoch, dataset = state.epoch + 1, load_dataset(**data)
    total = steps_per_epoch(len(dataset), train["batch_size"])
    bar = _ProgressBar(f"epoch {epoch}/{epochs}", total) if sys.stderr.isatty() else None
    if state.global_step == 0 and tracker.enabled:
        batches = epoch_batches(
            dataset,
            train["batch_size"],
            seed=train["seed"],
            epoch=epoch,
            random_flip=train["random_flip"],
        )
        tracker.log_inputs(0, next(batches))

    def on_step(step: int, m: dict[str, float]) -> None:
        if m["skipped"]:
            logger.warning(
                "step %d skipped: loss %s, gradient norm %s", step, m["loss"], m["grad_norm"]
            )
            return
        tracker.log_step(step, m)
        if step % log_every == 0:
            logger.info(
                "step %d  loss %.4f  lr %.3g  grad_norm %.3f",
                step,
                m["loss"],
                m["lr"],
                m["grad_norm"],
            )
        if bar is not None:
            bar.update(state.epoch_step, m["loss"])

    metrics = run_epoch(
        state,
        dataset,
        epoch,
        on_step=on_step,
        read_every=log_every,  # the step metrics are read from the device as they are logged
        checkpoint_dir=Path(checkpoint_dir),
        settings=settings,
        **train,
    )
    if bar is not None:
        bar.close()
    logger.info(
        "epoch %d/%d  loss %.4f  lr %.3g  %.0f img/s  %.1f s",
        epoch,
        epochs,
        metrics["loss"],
        metrics["lr"],
        metrics["images_per_s"],
        metrics["seconds"],
    )
    return metrics, state.snapshot(settings)


@task(name="checkpoint", cache_policy=NO_CACHE, persist_result=False)
def checkpoint_task(snapshot: dict[str, Any], checkpoint_dir: str, epoch: int, keep: int) -> str:
    """Atomically write checkpoints/epoch_XXX.pt from a CPU snapshot, keep the newest `keep`."""
    return str(save_epoch_checkpoint(snapshot, Path(checkpoint_dir), epoch, keep))


@task(name="sample-and-log", cache_policy=NO_CACHE, persist_result=False)
def sample_and_log_task(
    state: TrainingState,
    samples_dir: str,
    metrics: dict[str, float],
    sample: dict[str, Any],
    tracker: Tracker,
) -> str:
    """Draw a grid from fixed noise, save samples/epoch_XXX.png, and hand it with the epoch's
    metrics to tracking."""
    epoch = int(metrics["epoch"])
    path = save_grid(draw_samples(state, **sample), Path(samples_dir) / f"epoch_{epoch:03d}.png")
    tracker.log_epoch(metrics, path)
    get_run_logger().info("epoch %d samples: %s", epoch, path)
    return str(path)


class _ProgressBar:
    """A one-line progress bar on an interactive terminal's stderr."""

    def __init__(self, label: str, total: int, width: int = 30) -> None:
        self.label, self.total, self.width = label, max(total, 1), width

    def update(self, steps: int, loss: float) -> None:
        filled = self.width * min(steps, self.total) // self.total
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {steps}/{self.total}  loss {loss:.4f} ")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
