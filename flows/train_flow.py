"""train_flow: download -> build-model -> (train-epoch -> checkpoint -> sample-and-log) x epochs.

Run it with `python flows/train_flow.py [--group.field value ...]`; settings come from flags,
the environment (DDPM_*) and `.env`. Re-running the same command resumes the run; re-running a
finished run does nothing and says so.
"""

from __future__ import annotations

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

from ddpm.training import resolve_device, resolve_precision
from flows.tasks import (
    build_model_task,
    checkpoint_task,
    download_task,
    sample_and_log_task,
    train_epoch_task,
)
from flows.tracking import RunArtifacts, Tracker, publish_summary
from settings import (
    Settings,
    SettingsError,
    load_settings,
    parse_flags,
    result_changes,
    run_name,
    run_path,
)

SETTINGS_FILE = "settings.json"
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


def prepare_run_dir(cfg: Settings) -> Path:
    """Create the run folder and write settings.json (only when it changed).

    Raises:
        SettingsError: if the folder holds a run made with other result-changing settings
            (possible only with an explicit run.name).
    """
    run_dir = run_path(cfg)
    saved_file = run_dir / SETTINGS_FILE
    resolved = json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    if saved_file.is_file():
        changes = result_changes(json.loads(saved_file.read_text()), cfg)
        if changes:
            raise SettingsError(
                [
                    (
                        "run.name",
                        f"{run_dir} holds a run made with other settings "
                        f"({'; '.join(changes)}); pick another run.name",
                    )
                ]
            )
        if saved_file.read_text() == resolved:
            return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_file.write_text(resolved)
    return run_dir


def task_arguments(cfg: Settings, data_path: str) -> tuple[dict[str, Any], ...]:
    """The settings as the plain keyword arguments of the core calls the tasks make:
    (load_dataset, build_training, run_epoch, draw_samples). Device-dependent choices (bf16,
    fused kernels, compile) are resolved here, once."""
    accelerator = resolve_device(cfg.train.device)
    on_cuda, device = accelerator.type == "cuda", str(accelerator)
    data = {
        "dataset": cfg.data.dataset,
        "path": data_path,
        "image_size": cfg.data.image_size,
        "channels": cfg.model.channels,
        "subset": cfg.data.subset,
        "seed": cfg.train.seed,
    }
    model = {
        "hidden_size": cfg.model.hidden_size,
        "channels": cfg.model.channels,
        **cfg.diffusion.model_dump(),
        "optimizer": cfg.optim.name,
        "lr": cfg.optim.lr,
        "momentum": cfg.optim.momentum,
        "weight_decay": cfg.optim.weight_decay,
        "warmup_steps": cfg.optim.warmup_steps,
        "schedule": cfg.optim.schedule,
        "ema_decay": cfg.train.ema_decay,
        "seed": cfg.train.seed,
        "deterministic": cfg.train.deterministic,
        "precision": resolve_precision(cfg.train.precision, accelerator),
        "fused": on_cuda,
        "device_type": accelerator.type,
    }
    train = {
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
        "random_flip": cfg.data.random_flip,
        "num_workers": cfg.data.num_workers,
        "grad_clip": cfg.optim.grad_clip,
        "device": device,
        "max_bad_steps": cfg.train.max_bad_steps,
        "checkpoint_every": cfg.run.checkpoint_every,
        "loader": cfg.data.loader,
        "compile": cfg.train.compile == "on" or (cfg.train.compile == "auto" and on_cuda),
    }
    sample = {
        "num": cfg.sample.num,
        "sampler": cfg.sample.sampler,
        "steps": cfg.sample.steps,
        "eta": cfg.sample.eta,
        "seed": cfg.train.seed,
        "use_ema": cfg.sample.use_ema,
        "clip_denoised": cfg.sample.clip_denoised,
        "device": device,
        "image_shape": (cfg.model.channels, cfg.data.image_size, cfg.data.image_size),
        "compile": cfg.sample.compile == "on"
        or (cfg.sample.compile == "auto" and on_cuda and cfg.sample.sampler == "ddpm"),
    }
    return data, model, train, sample


@flow(name="train-flow", description="Train an unconditional DDPM, resumably.")
def train_flow(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume, or confirm finished) the run that the settings name.

    Args:
        overrides: dotted setting names to values, e.g. {"train.epochs": 3, "optim.lr": 2e-4},
            applied on top of the environment and `.env`.

    Returns:
        the run folder, epochs and steps done, the last checkpoint and the last epoch's metrics.
    """
    logger = get_run_logger()
    cfg = load_settings(overrides)
    run_dir, resolved = prepare_run_dir(cfg), cfg.model_dump(mode="json")
    logger.info("run %s; settings %s", run_dir, json.dumps(resolved))
    checkpoint_dir = str(run_dir / "checkpoints")

    folder = str(cfg.data.folder.resolve()) if cfg.data.folder else None
    download_args = (cfg.data.dataset, str(cfg.data.root.resolve()), cfg.data.url, folder)
    data_path = download_task(*download_args)
    if not Path(data_path).exists():  # cached, but deleted since: fetch again
        data_path = download_task.with_options(refresh_cache=True)(*download_args)
    data, model, train, sample = task_arguments(cfg, data_path)
    state = build_model_task(checkpoint_dir, data, model, cfg.train.batch_size, cfg.train.epochs)
    summary = {
        "run_dir": str(run_dir),
        "epochs": state.epoch,
        "global_step": state.global_step,
        "checkpoint": None,
        "metrics": {},
    }
    if state.epoch >= cfg.train.epochs:
        logger.info(
            "run %s already finished %d of %d epochs; nothing to do",
            run_dir,
            state.epoch,
            cfg.train.epochs,
        )
        publish_summary(cfg, run_dir, summary, None)
        return summary

    artifacts = RunArtifacts(state.epoch, cfg.train.epochs)
    tracker = Tracker.start(cfg, run_dir, run_name(cfg), run_dir / SETTINGS_FILE)
    failed = True
    try:
        # quote(): Prefect would otherwise walk every tensor of the state and the snapshot
        # on each task call, to track dependencies (about 0.16 s per epoch, measured).
        with gpu_slot(train["device"]):  # a CUDA run holds its GPU slot for all its epochs
            while state.epoch < cfg.train.epochs:
                metrics, snapshot = train_epoch_task(
                    quote(state),
                    data,
                    train,
                    checkpoint_dir,
                    resolved,
                    cfg.train.epochs,
                    cfg.train.log_every,
                    tracker,
                )
                epoch = int(metrics["epoch"])
                summary["checkpoint"] = checkpoint_task(
                    quote(snapshot), checkpoint_dir, epoch, cfg.run.keep
                )
                every = cfg.sample.every
                if every and (epoch % every == 0 or epoch == cfg.train.epochs):
                    sample_and_log_task(
                        quote(state), str(run_dir / "samples"), metrics, sample, tracker
                    )
                else:
                    tracker.log_epoch(metrics, None)
                artifacts.epoch_done(metrics)
                summary.update(epochs=epoch, global_step=state.global_step, metrics=metrics)
        failed = False
    finally:
        publish_summary(cfg, run_dir, summary, tracker.url)
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
