"""train_flow: download -> load-data -> build-model -> (train-epoch -> checkpoint ->
[evaluate] -> sample-and-log) x epochs.

Run it with `python flows/train_flow.py [--group.field value ...]`; settings come from flags,
the environment (DDPM_*) and `.env`. Re-running the same command resumes the run; re-running a
finished run does nothing and says so. SIGTERM or Ctrl-C saves a checkpoint and exits (see
flows.shutdown).
"""

if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main())

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_client, get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled, State
from prefect.utilities.annotations import quote

from ddpm.config import Config
from ddpm.data import TrainingData
from ddpm.distributed import Group
from ddpm.evaluation import inception_weights
from ddpm.run_dir import RunDir
from flows.cli import main
from flows.group import training_group
from flows.shutdown import StopRequest, active_stop_request
from flows.tasks import (
    build_model_task,
    checkpoint_task,
    download_task,
    evaluate_task,
    load_data_task,
    sample_and_log_task,
    train_epoch_task,
)
from flows.tracking import RunArtifacts, Tracker, publish_summary
from settings import Settings, SettingsError, core_config, load_settings, result_changes, run_path

__all__ = ["GPU_SLOT", "gpu_slot", "main", "open_run_dir", "train_flow"]

GPU_SLOT = "gpu"  # the global concurrency limit CUDA runs take a slot of


def _limit_exists(name: str) -> bool:
    """Whether the server has a global concurrency limit of this name."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


@contextlib.contextmanager
def gpu_slot(device: str, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold a slot of the global concurrency limit `gpu` while a CUDA run trains.

    With `prefect gcl create gpu --limit 1`, runs on one machine take turns on its GPU, a
    whole run at a time: a run keeps its model and optimizer state on the GPU between tasks,
    so turns per task would not free its memory (and would cost a server round trip per
    task). CPU runs take no slot; without the limit nothing waits.

    Raises:
        TimeoutError: if timeout_seconds pass without a free slot.
    """
    if torch.device(device).type != "cuda" or not _limit_exists(GPU_SLOT):
        yield
        return
    get_run_logger().info("waiting for a slot of the %r concurrency limit", GPU_SLOT)
    with concurrency(GPU_SLOT, occupy=1, timeout_seconds=timeout_seconds):
        yield


def _write_settings(run: RunDir, cfg: Settings) -> None:
    """Write the run's settings file (only when it changed).

    Raises:
        SettingsError: if the folder holds a run made with other result-changing settings
            (possible only with an explicit run.name).
    """
    resolved = json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    if run.settings_file.is_file():
        saved = run.settings_file.read_text()
        changes = result_changes(json.loads(saved), cfg)
        if changes:
            raise SettingsError(
                [
                    (
                        "run.name",
                        f"{run.path} holds a run made with other settings "
                        f"({'; '.join(changes)}); pick another run.name",
                    )
                ]
            )
        if saved == resolved:
            return
    run.settings_file.write_text(resolved)


@contextlib.contextmanager
def open_run_dir(cfg: Settings) -> Iterator[RunDir]:
    """The run folder, locked for this process, with its settings file written.

    A start that fails before the run wrote anything but its settings removes the folder it
    created, so a mistyped setting leaves no empty run behind.

    Raises:
        RunInUse: if another process is training this run.
        SettingsError: if the folder holds a run made with other result-changing settings.
    """
    run = RunDir(run_path(cfg))
    created = [p for p in (run.path.parent, run.path) if not p.exists()]
    try:
        with run.locked():
            _write_settings(run, cfg)
            yield run
    except BaseException:
        untouched = {run.settings_file, run.lock_file}
        if created and run.path.is_dir() and set(run.path.iterdir()) <= untouched:
            shutil.rmtree(run.path, ignore_errors=True)
            if run.path.parent in created:
                with contextlib.suppress(OSError):  # not empty: another run is there now
                    run.path.parent.rmdir()
        raise


@flow(name="train-flow", description="Train an unconditional DDPM, resumably.")
def train_flow(overrides: dict[str, Any] | None = None) -> dict[str, Any] | State:
    """Train (or resume, or confirm finished) the run that the settings name.

    SIGTERM and SIGINT stop it after the current step with a checkpoint (flows.shutdown); so
    does the Prefect API going away, after which the process exits.

    Args:
        overrides: dotted setting names to values, e.g. {"train.epochs": 3, "optim.lr": 2e-4},
            applied on top of the environment and `.env`.

    Returns:
        the run folder, epochs and steps done, the last checkpoint and the last epoch's
        result; a Cancelled state naming the checkpoint when a stop request ended it early.
    """
    cfg = load_settings(overrides)
    stop = active_stop_request() or StopRequest(cfg.run.stop_timeout)
    with stop.signals_handled(), stop.watching_api(PREFECT_API_URL.value()):
        summary = _train(cfg, stop, overrides)
    if stop():
        return Cancelled(
            message=f"{stop.reason}: stopped at step {summary['global_step']}; "
            f"newest checkpoint {summary['checkpoint']}; re-run to resume"
        )
    return summary


def _train(cfg: Settings, stop: StopRequest, overrides: dict[str, Any] | None) -> dict[str, Any]:
    logger = get_run_logger()
    config, resolved = core_config(cfg), cfg.model_dump(mode="json")
    if config.eval.every:  # missing Inception weights fail now, not after the first epoch
        inception_weights(config.eval.weights)
    with open_run_dir(cfg) as run, training_group(config, overrides) as group:
        logger.info("run %s; settings %s", run.path, json.dumps(resolved))
        if group is not None:  # this process is rank 0: its device is cuda:LOCAL_RANK
            config = group.place(config)
            logger.info(
                "training data-parallel on %d processes (%s); this is rank 0%s",
                group.world_size, "NCCL" if config.train.device.startswith("cuda") else "gloo",
                "".join(f"; rank {r}: pid {p.pid}" for r, p in group.followers.items()),
            )  # fmt: skip
        where = config.data
        download_args = (
            where.dataset,
            str(where.root),
            where.url,
            where.folder and str(where.folder),
        )
        data_path = download_task(*download_args)
        if not Path(data_path).exists():  # cached, but deleted since: fetch again
            data_path = download_task.with_options(refresh_cache=True)(*download_args)
        if group is not None:
            group.data_path = data_path
        data = load_data_task(config, data_path)
        try:
            return _train_epochs(cfg, config, run, data, data_path, stop, resolved, group)
        finally:
            data.close()  # DataLoader workers, if any, stop with the run


def _due(every: int, epoch: int, epochs: int) -> bool:
    """Whether a thing done every `every` epochs (0 = never) is due after `epoch`: on its
    multiples and after the last epoch."""
    return bool(every) and (epoch % every == 0 or epoch == epochs)


def _train_epochs(
    cfg: Settings,
    config: Config,
    run: RunDir,
    data: TrainingData,
    data_path: str,
    stop: StopRequest,
    resolved: dict[str, Any],
    group: Group | None,
) -> dict[str, Any]:
    logger = get_run_logger()
    state = build_model_task(config, run, data.steps_per_epoch, resolved)
    newest = run.step_checkpoints() or run.epoch_checkpoints()  # an epoch's removes steps'
    summary = {
        "run_dir": str(run.path),
        "epochs": state.epoch,
        "global_step": state.global_step,
        "checkpoint": str(newest[-1]) if newest else None,
        "metrics": {},
    }
    epochs = config.train.epochs
    if state.epoch >= epochs:
        logger.info(
            "run %s already finished %d of %d epochs; nothing to do", run.path, state.epoch, epochs
        )
        publish_summary(cfg, run, summary, None)
        return summary

    artifacts = RunArtifacts(state.epoch, epochs)
    tracker = Tracker.start(cfg, run)
    stop.checkpoint = summary["checkpoint"]
    stop.on_leave(lambda: tracker.finish(stop.exit_code))
    exit_code = 1
    try:
        # quote(): Prefect would otherwise walk every tensor of the state, the data and the
        # snapshot on each task call, to track dependencies (about 0.16 s per epoch, measured).
        with gpu_slot(config.train.device):  # a CUDA run holds its GPU slot for all its epochs
            while state.epoch < epochs and not stop():
                result, snapshot = train_epoch_task(
                    quote(state), quote(data), config, run, tracker, quote(stop), quote(group)
                )
                summary["global_step"] = result.global_step
                if snapshot is None:  # stopped mid-epoch, saved in a mid-epoch checkpoint
                    summary["checkpoint"] = stop.checkpoint
                    break
                summary["checkpoint"] = checkpoint_task(quote(snapshot), run, config.train.keep)
                stop.checkpoint = summary["checkpoint"]
                stop.unsaved(None)
                evaluation = None
                if _due(config.eval.every, result.epoch, epochs) and not stop():
                    evaluation = evaluate_task(
                        quote(state), quote(data), config, run, result, summary["checkpoint"],
                        data_path, tracker, quote(stop),
                    )  # fmt: skip
                if _due(config.sample.every, result.epoch, epochs) and not stop():
                    sample_and_log_task(quote(state), config, run, result, tracker, quote(stop))
                else:
                    tracker.log_epoch(result, None)
                artifacts.epoch_done(result, evaluation)
                summary.update(epochs=result.epoch, metrics=dataclasses.asdict(result))
        exit_code = stop.exit_code
    finally:
        tracker.finish(exit_code)
        publish_summary(cfg, run, summary, tracker.url)
    return summary
