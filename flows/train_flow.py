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
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled, State
from prefect.utilities.annotations import quote

from ddpm.build import with_sigma_data
from ddpm.config import Config
from ddpm.distributed import Group, environment, join
from ddpm.evaluation import inception_weights
from ddpm.files import checksum_file, remove_partial_writes, write_checked
from ddpm.group_training import share_start
from ddpm.prepare import reading_prepared
from ddpm.run_dir import RunDir
from ddpm.trainer import EpochResult, Trainer
from flows.download import download_task
from flows.gpu import gpu_slot
from flows.launch import LaunchError, launch
from flows.prepare_flow import prepare_folder_task
from flows.shutdown import StopRequest, active_stop_request
from flows.sweep.trial_report import TrialReport
from flows.tracking import (
    RunArtifacts,
    Tracker,
    core_logs_routed,
    publish_metrics,
    publish_summary,
)
from flows.train_tasks import (
    build_model_task,
    checkpoint_task,
    evaluate_task,
    load_data_task,
    sample_and_log_task,
    train_epoch_task,
)
from settings import Settings, SettingsError, core_config, load_settings, result_changes, run_path

__all__ = ["open_run_dir", "train_flow"]


def _write_settings(run: RunDir, cfg: Settings) -> None:
    """Write the run's settings file, atomically (only when it changed).

    Raises:
        SettingsError: if the folder holds a run made with other result-changing settings
            (possible only with an explicit run.name).
    """
    resolved = json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    saved = run.saved_settings()  # a damaged file: recovered from a checkpoint, or None
    if saved is not None:
        changes = result_changes(saved, cfg)
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
        with contextlib.suppress(OSError):
            if run.settings_file.read_bytes() == resolved.encode():
                return
    write_checked(run.settings_file, resolved)


@contextlib.contextmanager
def open_run_dir(cfg: Settings) -> Iterator[RunDir]:
    """The run folder, locked for this process, with its settings file written.

    A start that fails before the run wrote anything but its settings removes the folder it
    created, so a mistyped setting leaves no empty run behind.

    Raises:
        NotOurs: if the folder holds files that are not a run's (nothing is written).
        RunInUse: if another process is training this run.
        SettingsError: if the folder holds a run made with other result-changing settings.
    """
    run = RunDir(run_path(cfg))
    run.claim()  # a folder of the user's (an explicit run.name) is refused, untouched
    created = [p for p in (run.path.parent, run.path) if not p.exists()]
    try:
        with run.locked():
            for folder in (run.path, run.checkpoints, run.samples):
                remove_partial_writes(folder)  # a killed write's, now the lock is ours
            _write_settings(run, cfg)
            yield run
    except BaseException:
        # All this start wrote, if nothing else is there.
        written = {run.settings_file, checksum_file(run.settings_file), run.lock_file}
        if run.path in created and run.path.is_dir() and set(run.path.iterdir()) <= written:
            with contextlib.suppress(OSError):  # rmdir: never a file written meanwhile
                for path in written:
                    path.unlink(missing_ok=True)
                run.path.rmdir()
                if run.path.parent in created:
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
    with core_logs_routed():
        cfg = load_settings(overrides)
        stop = active_stop_request() or StopRequest(cfg.run.stop_timeout)
        if cfg.train.devices > 1 and environment() is None:
            return _launch(cfg, overrides, stop)
        with stop.signals_handled(), stop.watching_api(PREFECT_API_URL.value()):
            summary = _train(cfg, stop)
        if stop():
            pruned = stop.exit_code == 0  # a sweep's pruner (flows.sweep.trial_report) stopped it
            return Cancelled(
                message=f"{stop.reason}: stopped at step {summary['global_step']}; "
                f"newest checkpoint {summary['checkpoint']}"
                + ("" if pruned else "; re-run to resume")
            )
        return summary


def _launch(cfg: Settings, overrides: dict[str, Any] | None, stop: StopRequest) -> Any:
    """Train on train.devices processes started by torch's elastic launcher (flows.launch):
    rank 0 runs train_flow in a flow run of its own; this one waits and returns its result."""
    devices, restarts = cfg.train.devices, cfg.train.max_restarts
    get_run_logger().info(
        "starting %d ranks through torch's elastic launcher (train.max_restarts %d); rank 0 "
        "trains in a train-flow run of its own", devices, restarts,
    )  # fmt: skip
    outcome = launch(
        devices, restarts, cfg.run.stop_timeout, overrides or {}, PREFECT_API_URL.value()
    )
    code, message = outcome["exit_code"], outcome["message"]
    if code == 0:
        return outcome["summary"]
    if code >= 128:  # the launcher was signalled; every rank stopped after the same step
        stop.request(f"{signal.Signals(code - 128).name} received", code, deadline=False)
        return Cancelled(message=message)
    raise LaunchError(message, code)


@contextlib.contextmanager
def _group(config: Config) -> Iterator[Group | None]:
    """This process's data-parallel group when a launcher started it as one rank (rank 0
    here), else None.

    Raises:
        SettingsError: if train.devices differs from the size of the launcher's group.
    """
    env = environment()
    if env is None:
        yield None
        return
    if config.train.devices not in (1, env["world_size"]):
        raise SettingsError(
            [("train.devices", f"{config.train.devices} differs from the launcher's WORLD_SIZE "
              f"({env['world_size']}); leave it out under torchrun")]
        )  # fmt: skip
    group = join(config.train.device, config.train.rank_timeout)
    try:
        yield group
    finally:
        group.leave()


def _train(cfg: Settings, stop: StopRequest) -> dict[str, Any]:
    logger = get_run_logger()
    config, resolved = core_config(cfg), cfg.model_dump(mode="json")
    if config.eval.every:  # missing Inception weights fail now, not after the first epoch
        inception_weights(config.eval.weights)
    with _group(config) as group, open_run_dir(cfg) as run:
        logger.info("run %s; settings %s", run.path, json.dumps(resolved))
        if group is not None:  # this process is rank 0: its device is cuda:LOCAL_RANK
            config = group.place(config)
            device = config.train.device
            logger.info(
                "training data-parallel on %d processes (%s); this is rank 0 (pid %d)",
                group.world_size, "NCCL" if device.startswith("cuda") else "gloo", os.getpid(),
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
        if where.dataset == "folder" and where.prepare == "auto":
            data_path = prepare_folder_task(data_path, str(where.root / "prepared"),
                                            where.image_size, config.model.channels)  # fmt: skip
            config = reading_prepared(config, data_path)
        data = load_data_task(config, data_path, group and (group.rank, group.world_size))
        if config.diffusion.formulation == "edm":
            measured = config.diffusion.sigma_data is None
            config = with_sigma_data(config, data.dataset)
            logger.info("diffusion.sigma_data %.4f%s", config.diffusion.sigma_data,
                        ", measured on the training images" if measured else "")  # fmt: skip
        try:
            state = build_model_task(config, run, data.steps_per_epoch, resolved)
            if group is not None:  # the other ranks start from this state
                share_start(group, state, data_path, config.data.dataset)
            trainer = Trainer(state, data, config.train, run, group=group)
            return _train_epochs(cfg, config, trainer, data_path, stop)
        finally:
            data.close()  # DataLoader workers, if any, stop with the run


def _due(every: int, epoch: int, epochs: int) -> bool:
    """Whether a thing done every `every` epochs (0 = never) is due after `epoch`: on its
    multiples and after the last epoch."""
    return bool(every) and (epoch % every == 0 or epoch == epochs)


def _train_epochs(
    cfg: Settings, config: Config, trainer: Trainer, data_path: str, stop: StopRequest
) -> dict[str, Any]:
    logger = get_run_logger()
    state, run, epochs = trainer.state, trainer.run, config.train.epochs
    newest = run.step_checkpoints() or run.epoch_checkpoints()  # an epoch's removes steps'
    summary = {
        "run_dir": str(run.path),
        "epochs": state.epoch,
        "global_step": state.global_step,
        "checkpoint": str(newest[-1]) if newest else None,
        "metrics": {},
    }
    if state.epoch >= epochs:
        logger.info(
            "run %s already finished %d of %d epochs; nothing to do", run.path, state.epoch, epochs
        )
        publish_metrics(run.metrics_rows())  # what a sweep reads (flows.sweep.trial_result)
        publish_summary(cfg, run, summary, None)
        return summary

    artifacts = RunArtifacts(run, state.epoch, epochs)
    report = TrialReport.of(cfg, artifacts.rows)  # a sweep's trial: its metric to its pruner
    tracker = Tracker.start(cfg, run)
    stop.checkpoint = summary["checkpoint"]
    stop.on_leave(lambda: tracker.finish(stop.exit_code))
    exit_code = 1
    try:
        # quote(): Prefect would otherwise walk every tensor of the state, the data and the
        # snapshot on each task call, to track dependencies (about 0.16 s per epoch, measured).
        with gpu_slot(config.train.device):  # a CUDA run holds its GPU slot for all its epochs
            # A stop request between epochs ends the next one at its first step: in a group,
            # the other ranks learn of it there.
            while state.epoch < epochs:
                result, snapshot = train_epoch_task(quote(trainer), tracker, quote(stop))
                summary["global_step"] = result.global_step
                if snapshot is None:  # stopped mid-epoch, saved in a mid-epoch checkpoint
                    summary["checkpoint"] = stop.checkpoint
                    break
                artifacts.epoch_trained(result)
                # The rows so far go into the checkpoint too: a damaged metrics.jsonl is
                # recovered from it (RunDir.metrics_rows).
                snapshot["metrics"] = [dict(row) for row in artifacts.rows]
                summary["checkpoint"] = checkpoint_task(quote(snapshot), run, config.train.keep)
                stop.checkpoint = summary["checkpoint"]
                stop.unsaved(None)
                evaluation = _evaluate_and_sample(
                    config, trainer, result, summary["checkpoint"], data_path, tracker, stop
                )
                artifacts.epoch_done(result, evaluation)
                summary.update(epochs=result.epoch, metrics=dataclasses.asdict(result))
                pruned = report and report.pruned(result.epoch, result.loss, evaluation)
                if pruned and state.epoch < epochs:
                    logger.info("%s; checkpoint %s kept", pruned, summary["checkpoint"])
                    stop.request(pruned, 0, deadline=False)
                    break
        exit_code = stop.exit_code
    finally:
        tracker.finish(exit_code)
        publish_summary(cfg, run, summary, tracker.url)
    return summary


def _evaluate_and_sample(
    config: Config,
    trainer: Trainer,
    result: EpochResult,
    checkpoint: str,
    data_path: str,
    tracker: Tracker,
    stop: StopRequest,
) -> dict[str, float] | None:
    """After an epoch: evaluate, and draw the sample grid, where due (a stop request skips
    them); the epoch's result goes to tracking with its grid or alone. Returns the metrics."""
    epochs, evaluation = config.train.epochs, None
    if _due(config.eval.every, result.epoch, epochs) and not stop():
        evaluation = evaluate_task(
            quote(trainer), config, result, checkpoint, data_path, tracker, quote(stop)
        )
    if _due(config.sample.every, result.epoch, epochs) and not stop():
        sample_and_log_task(quote(trainer.state), config, trainer.run, result, tracker, quote(stop))
    else:
        tracker.log_epoch(result, None)
    return evaluation
