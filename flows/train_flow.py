"""train_flow: download -> build-model -> (train-epoch -> checkpoint -> sample-and-log) x epochs.

Run it with `python flows/train_flow.py [--group.field value ...]`; settings come from flags,
the environment (DDPM_*) and `.env`. Re-running the same command resumes the run; re-running a
finished run does nothing and says so.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_client, get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.utilities.annotations import quote

from ddpm.run_dir import RunDir
from flows.tasks import (
    build_model_task,
    checkpoint_task,
    download_task,
    load_data_task,
    sample_and_log_task,
    train_epoch_task,
)
from flows.tracking import RunArtifacts, Tracker, publish_summary
from settings import (
    Settings,
    SettingsError,
    core_config,
    load_settings,
    parse_flags,
    result_changes,
    run_path,
)

GPU_SLOT = "gpu"  # the global concurrency limit CUDA runs take a slot of


def _limit_exists(name: str) -> bool:
    """Whether the server has a global concurrency limit of this name."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


@contextmanager
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


def prepare_run_dir(cfg: Settings) -> RunDir:
    """Create the run folder and write its settings file (only when it changed).

    Raises:
        SettingsError: if the folder holds a run made with other result-changing settings
            (possible only with an explicit run.name).
    """
    run = RunDir(run_path(cfg))
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
            return run
    run.path.mkdir(parents=True, exist_ok=True)
    run.settings_file.write_text(resolved)
    return run


@flow(name="train-flow", description="Train an unconditional DDPM, resumably.")
def train_flow(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume, or confirm finished) the run that the settings name.

    Args:
        overrides: dotted setting names to values, e.g. {"train.epochs": 3, "optim.lr": 2e-4},
            applied on top of the environment and `.env`.

    Returns:
        the run folder, epochs and steps done, the last checkpoint and the last epoch's result.
    """
    logger = get_run_logger()
    cfg = load_settings(overrides)
    config, run, resolved = core_config(cfg), prepare_run_dir(cfg), cfg.model_dump(mode="json")
    logger.info("run %s; settings %s", run.path, json.dumps(resolved))

    where = config.data
    download_args = (where.dataset, str(where.root), where.url, where.folder and str(where.folder))
    data_path = download_task(*download_args)
    if not Path(data_path).exists():  # cached, but deleted since: fetch again
        data_path = download_task.with_options(refresh_cache=True)(*download_args)
    data = load_data_task(config, data_path)
    state = build_model_task(config, run, data.steps_per_epoch, resolved)
    checkpoints = run.epoch_checkpoints()
    summary = {
        "run_dir": str(run.path),
        "epochs": state.epoch,
        "global_step": state.global_step,
        "checkpoint": str(checkpoints[-1]) if checkpoints else None,
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
    failed = True
    try:
        # quote(): Prefect would otherwise walk every tensor of the state, the data and the
        # snapshot on each task call, to track dependencies (about 0.16 s per epoch, measured).
        with gpu_slot(config.train.device):  # a CUDA run holds its GPU slot for all its epochs
            while state.epoch < epochs:
                result, snapshot = train_epoch_task(quote(state), quote(data), config, run, tracker)
                summary["checkpoint"] = checkpoint_task(quote(snapshot), run, config.train.keep)
                every = config.sample.every
                if every and (result.epoch % every == 0 or result.epoch == epochs):
                    sample_and_log_task(quote(state), config, run, result, tracker)
                else:
                    tracker.log_epoch(result, None)
                artifacts.epoch_done(result)
                summary.update(
                    epochs=result.epoch,
                    global_step=result.global_step,
                    metrics=dataclasses.asdict(result),
                )
        failed = False
    finally:
        data.close()  # DataLoader workers, if any, stop with the run
        publish_summary(cfg, run, summary, tracker.url)
        tracker.finish(failed)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Parse flags, validate settings (exit 2 on bad ones, before Prefect starts), run."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides = parse_flags(argv, prog="python flows/train_flow.py")
        load_settings(overrides)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = train_flow(overrides=overrides or None, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
