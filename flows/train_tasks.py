"""The Prefect tasks of train_flow: each a thin wrapper over one call into the core.

Only train-epoch, sample-and-log and evaluate touch the accelerator. Turns on a shared GPU are
taken per run, not per task (see train_flow.gpu_slot): a run keeps its model on the GPU between
tasks. Tasks that carry a model or the data never hash or persist them (cache_policy=NO_CACHE, no
result files).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ddpm.batches import TrainingData
from ddpm.build import build_or_resume, rewind
from ddpm.config import Config
from ddpm.datasets import load_dataset
from ddpm.distributed import Group, RankFailed
from ddpm.errors import UserError, first_line
from ddpm.evaluation import compute_metrics
from ddpm.generate import draw_samples, sample_set
from ddpm.images import save_grid
from ddpm.run_dir import RunDir, keep_best, save_epoch_checkpoint
from ddpm.trainer import EpochResult, Hooks, StepMetrics, Trainer, TrainingDiverged
from ddpm.training import TrainingState
from flows.download import data_reference_key
from flows.progress import ProgressBar
from flows.sample_tasks import SamplingStopped, sampler_steps, stop_check
from flows.shutdown import StopRequest
from flows.tracking import Tracker, publish_samples


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry train-epoch unless it failed for a reason a retry cannot change: divergence
    (train.max_bad_steps), a rank of the group lost, or one the user must fix (an
    incompatible checkpoint, an unwritable folder)."""
    return not isinstance(state.data, (TrainingDiverged, RankFailed, UserError))


@task(name="load-data", cache_policy=NO_CACHE, persist_result=False)
def load_data_task(config: Config, path: str, shard: tuple[int, int] | None = None) -> TrainingData:
    """Read the training images at path once for the whole run (CIFAR-10 into memory; an image
    folder is listed and checked); every epoch draws its batches from the result (with a
    shard (rank, world_size), this rank's slice of each global batch)."""
    data = TrainingData(load_dataset(config, path), config, *(shard or (0, 1)))
    get_run_logger().info("%d training images, %d steps per epoch", len(data), data.steps_per_epoch)
    return data


@task(name="build-model", cache_policy=NO_CACHE, persist_result=False)
def build_model_task(
    config: Config, run: RunDir, steps_per_epoch: int, settings: dict[str, Any]
) -> TrainingState:
    """Build the model, optimizer, lr schedule and EMA on the CPU, or resume them from the run's
    newest valid checkpoint; the run's steps (the cosine schedule needs them) are
    steps_per_epoch * train.epochs."""
    logger = get_run_logger()
    total_steps = steps_per_epoch * config.train.epochs
    state = build_or_resume(config, total_steps, run, settings)
    if state.epoch >= config.train.epochs:
        return state  # a finished run: train_flow says "nothing to do", nothing more
    if state.global_step:
        logger.info(
            "resumed after step %d (epoch %d done, %d batches of the next)",
            state.global_step,
            state.epoch,
            state.epoch_step,
        )
    warmup = state.scheduler.lr_lambdas[0].warmup_steps  # as the run started (LRSchedule)
    if warmup < config.optim.warmup_steps:
        logger.info(
            "lr warm-up %d steps: optim.warmup_steps (%d) cut to a tenth of the run's steps",
            warmup,
            config.optim.warmup_steps,
        )
    return state


class _EpochHooks(Hooks):
    """The train-epoch task's part in the loop: stop requests, the progress bar, logging and
    tracking of every step."""

    def __init__(self, stop: StopRequest, bar: ProgressBar, tracker: Tracker, log_every: int):
        self.stop, self.bar, self.tracker, self.log_every = stop, bar, tracker, log_every
        self.logger = get_run_logger()

    def should_stop(self) -> bool:
        return self.stop()

    def after_step(self, step: int) -> None:
        self.bar.advance()

    def on_step(self, step: int, m: StepMetrics) -> None:
        if m.skipped:
            self.logger.warning(
                "step %d skipped: loss %s, gradient norm %s", step, m.loss, m.grad_norm
            )
            return
        self.tracker.log_step(step, m)
        self.bar.note(f"loss {m.loss:.4f}")
        if step % self.log_every == 0:
            self.logger.info(
                "step %d  loss %.4f  lr %.3g  grad_norm %.3f", step, m.loss, m.lr, m.grad_norm
            )


@task(
    name="train-epoch",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def train_epoch_task(
    trainer: Trainer, tracker: Tracker, stop: StopRequest
) -> tuple[EpochResult, dict[str, Any] | None]:
    """Train the next epoch on the training device; return what it did and a CPU snapshot
    (None when a stop request ended it early: its state is then in a mid-epoch checkpoint).

    A retry (or any call on a state left dirty) first rewinds to the newest valid checkpoint,
    so no step is counted twice. Every step goes to the tracker, in batches of
    train.log_every (steps never wait for the device in between); the first epoch's first
    batch, as the model sees it, too. When the Prefect API is gone, the newest state is saved
    here and the process exits (nothing after this could be reported). In a data-parallel
    group (this is rank 0) a failed epoch is not retried here: the other ranks are mid-epoch,
    so the process fails and the launcher restarts the whole group from the checkpoint.
    """
    logger = get_run_logger()
    state, train, run = trainer.state, trainer.train, trainer.run
    if state.dirty:
        source = rewind(state, run)
        logger.warning("rewound to %s (epoch %d, step %d)", source, state.epoch, state.global_step)
    epoch = state.epoch + 1
    if state.global_step == 0 and tracker.enabled:
        tracker.log_inputs(0, next(iter(trainer.data.epoch(epoch))))
    steps = trainer.data.steps_per_epoch
    bar = ProgressBar(f"epoch {epoch}/{train.epochs}", steps, state.epoch_step)
    trainer.hooks = _EpochHooks(stop, bar, tracker, train.log_every)
    with bar, stop.training(), _fails_the_group(trainer.group):
        result = trainer.epoch()
    if result.stopped:  # the trainer saved its steps in a mid-epoch checkpoint
        if result.steps:
            stop.checkpoint = str(run.step_checkpoint(result.global_step))
        logger.warning(
            "%s: stopped after step %d (epoch %d, batch %d of %d); newest checkpoint %s",
            stop.reason, result.global_step, result.epoch, state.epoch_step,
            trainer.data.steps_per_epoch, stop.checkpoint,
        )  # fmt: skip
        stop.unsaved(None)  # leaves now if the API is gone
        return result, None
    snapshot = state.snapshot()
    # Until the checkpoint task has written it, the epoch lives only here.
    stop.unsaved(lambda: str(save_epoch_checkpoint(snapshot, run, train.keep)))
    logger.info(
        "epoch %d/%d  loss %.4f  lr %.3g  %.0f img/s  %.1f s",
        result.epoch,
        train.epochs,
        result.loss,
        result.lr,
        result.images_per_s,
        result.seconds,
    )
    return result, snapshot


@contextlib.contextmanager
def _fails_the_group(group: Group | None) -> Iterator[None]:
    """In a group, turn a failure a retry could cure into RankFailed (never retried)."""
    try:
        yield
    except (TrainingDiverged, RankFailed, UserError):
        raise
    except Exception as err:
        if group is None:
            raise
        raise RankFailed(f"rank 0: {first_line(err)}") from err


@task(name="checkpoint", cache_policy=NO_CACHE, persist_result=False)
def checkpoint_task(snapshot: dict[str, Any], run: RunDir, keep: int) -> str:
    """Atomically write the snapshot's checkpoints/epoch_XXX.pt, keep the newest `keep`."""
    return str(save_epoch_checkpoint(snapshot, run, keep))


@task(name="sample-and-log", cache_policy=NO_CACHE, persist_result=False)
def sample_and_log_task(
    state: TrainingState,
    config: Config,
    run: RunDir,
    result: EpochResult,
    tracker: Tracker,
    stop: StopRequest,
) -> str | None:
    """Draw a grid from fixed noise, save samples/epoch_XXX.png, hand it with the epoch's
    result to tracking and show it in the UI (artifact `samples`); a stop request drops the
    grid (the epoch is already saved)."""
    sample = config.sample
    with ProgressBar(f"samples after epoch {result.epoch}", sampler_steps(config)) as bar:
        try:
            x = draw_samples(
                state, sample, config.image_shape, config.train.seed, stop_check(stop, bar)
            )
        except SamplingStopped:
            tracker.log_epoch(result, None)
            get_run_logger().warning(
                "%s: sample grid of epoch %d dropped", stop.reason, result.epoch
            )
            return None
    path = save_grid(x, run.grid(result.epoch))
    tracker.log_epoch(result, path)
    publish_samples(path, result.epoch)
    get_run_logger().info("epoch %d samples: %s", result.epoch, path)
    return str(path)


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_task(
    trainer: Trainer,
    config: Config,
    result: EpochResult,
    checkpoint: str,
    data_path: str,
    tracker: Tracker,
    stop: StopRequest,
) -> dict[str, float] | None:
    """Draw eval.num_samples images (the sample grid's sampler and weights, images 0.. of the
    run's seed, so every evaluation sees the same noise), score them against the training
    images (statistics cached), log eval/* and keep checkpoints/best.pt at the lowest FID.
    A stop request drops the evaluation (None)."""
    logger = get_run_logger()
    state, data, run = trainer.state, trainer.data, trainer.run
    ev, sample = config.eval, config.sample
    model = state.ema.module if sample.use_ema and state.ema is not None else state.diffusion
    steps = -(-ev.num_samples // ev.batch_size) * sampler_steps(config)
    with ProgressBar(f"evaluation after epoch {result.epoch}", steps) as bar:
        try:
            images = sample_set(
                model, ev.num_samples, config.image_shape, sample, config.train.seed,
                ev.batch_size, state.precision, stop_check(stop, bar),
            )  # fmt: skip
        except SamplingStopped:
            logger.warning("%s: evaluation of epoch %d dropped", stop.reason, result.epoch)
            return None
    metrics = compute_metrics(
        images, data.dataset, reference_key=data_reference_key(config, data_path),
        cache_dir=ev.cache_dir, metrics=ev.metrics, weights=ev.weights,
        batch_size=ev.batch_size, device=config.train.device,
    )  # fmt: skip
    tracker.log_eval(result.global_step, metrics)
    line = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    logger.info("epoch %d, %d samples: %s", result.epoch, ev.num_samples, line)
    if "fid" in metrics and keep_best(run, Path(checkpoint), result.epoch, metrics):
        logger.info("best FID so far: %s is now %s", checkpoint, run.best_checkpoint)
    return metrics
