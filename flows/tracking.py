"""Experiment tracking: a Weights & Biases run per training run, and Prefect UI artifacts.

W&B: the resolved settings as the run config, the settings file as a `config` artifact, each
step's loss (and its running mean over the epoch), lr and gradient norm, each epoch's mean loss,
images/s, time and sample grid, and the first epoch's input batch. Never the code. Per-step
metrics are plotted against `global_step` (not W&B's internal step), so a retried epoch's steps
are kept rather than dropped as out of order.

Prefect: artifacts with stable keys, so the UI shows their history across epochs and runs;
pictures (the newest sample grid, a sweep's plot) are image artifacts that carry the image
itself, as a data: URI, since the browser showing the UI cannot reach the run folder.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from ddpm.files import DamagedFile, read_checked, write_checked
from ddpm.images import sample_grid, web_image
from ddpm.run_dir import RunDir
from ddpm.trainer import EpochResult, StepMetrics
from settings import Settings

PROGRESS_KEY, METRICS_KEY, SUMMARY_KEY, LINK_KEY, SAMPLES_KEY = (
    "training-progress",
    "epoch-metrics",
    "run-summary",
    "wandb-run",
    "samples",
)
# The most an image artifact's picture may take (its data: URI is a third more): the server
# keeps every version in its database, one a grid. The default grid (64 images of 32 px, 274 px
# square) fits at full size: a PNG of 120-200 KB, a JPEG of 32-68 KB (photos, noise; measured),
# so each grid of a run costs the database at most about 171 KiB.
IMAGE_BYTES = 128 * 1024


@contextlib.contextmanager
def core_logs_routed() -> Iterator[None]:
    """While inside, send the core's log lines (logger `ddpm`: a skipped checkpoint, an
    unreadable image) to the flow run's logs, as Prefect does for the loggers named in
    PREFECT_LOGGING_EXTRA_LOGGERS (without setting that variable for the whole process)."""
    core = logging.getLogger("ddpm")
    added = [h for h in logging.getLogger("prefect.extra").handlers if h not in core.handlers]
    for handler in added:
        core.addHandler(handler)
    try:
        yield
    finally:
        for handler in added:
            core.removeHandler(handler)


def resolve_wandb_mode(mode: str) -> str:
    """auto -> online when WANDB_API_KEY is set, else offline; other modes as named."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


_WANDB_ID = re.compile(r"^[0-9a-z]{1,64}$")  # what wandb_run_id makes (16 hex digits)
_LOG = logging.getLogger(__name__)


def wandb_run_id(id_file: Path, wandb_dir: Path | None = None) -> str:
    """The W&B run id kept in id_file (made on first use, written atomically), so a resumed
    run continues its W&B run.

    A damaged id file is recovered from the newest W&B run folder under wandb_dir/wandb
    (`offline-run-<time>-<id>` or `run-<time>-<id>`), else replaced by a new id (a new W&B
    run), with a warning either way.
    """
    try:
        saved = read_checked(id_file, "").strip()
    except FileNotFoundError:
        saved = None
    except DamagedFile as err:
        saved = f"unreadable: {err}"
    if saved is not None and _WANDB_ID.match(saved):
        return saved
    run_id = secrets.token_hex(8)
    if saved is not None:
        found = sorted(Path(wandb_dir or id_file.parent).glob("wandb/*run-*-*"))
        ids = [p.name.rsplit("-", 1)[1] for p in found if _WANDB_ID.match(p.name.rsplit("-", 1)[1])]
        run_id, source = (ids[-1], "its newest W&B run folder") if ids else (run_id, "a new id")
        _LOG.warning("%s is damaged (%r is not a W&B run id); recovered from %s", id_file,
                     saved[:80], source)  # fmt: skip
    write_checked(id_file, run_id + "\n")
    return run_id


def _wandb_dir(folder: Path) -> Path:
    """Where W&B writes a run's files: WANDB_DIR, else the run's own folder."""
    return Path(os.environ.get("WANDB_DIR") or folder)


class Tracker:
    """Logs one training run to W&B; every method is a no-op when W&B is disabled."""

    def __init__(self, run: Any | None, online: bool = False) -> None:
        self.run, self.online = run, online
        self._loss_sum, self._loss_steps = 0.0, 0

    @classmethod
    def start(cls, cfg: Settings, run: RunDir) -> Tracker:
        """Start (or resume) the run's W&B run, named after the run folder; files go to
        WANDB_DIR or the run folder.

        The W&B id is kept in the run folder (RunDir.wandb_id_file), so a resumed training
        continues the same W&B run (resume="allow").
        """
        mode = resolve_wandb_mode(cfg.wandb.mode)
        if mode == "disabled":
            return cls(None)
        import wandb

        name = run.name
        wandb_run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            group=cfg.wandb.group,
            name=name,
            id=wandb_run_id(run.wandb_id_file, _wandb_dir(run.path)),
            resume="allow",
            dir=str(_wandb_dir(run.path)),
            mode=mode,
            config=cfg.model_dump(mode="json"),
            settings=wandb.Settings(
                save_code=False,
                disable_code=True,
                disable_git=True,
                disable_job_creation=True,
                x_save_requirements=False,
                console="off",  # the Prefect run logs already hold the console output
                silent=True,
            ),
        )
        wandb_run.define_metric("global_step")
        wandb_run.define_metric("*", step_metric="global_step")
        artifact = wandb.Artifact(f"settings-{name}", type="config")
        artifact.add_file(str(run.settings_file), name=run.settings_file.name)
        wandb_run.log_artifact(artifact)
        return cls(wandb_run, online=mode == "online")

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def url(self) -> str | None:
        """The W&B run's page when online, else None."""
        return self.run.url if self.run is not None and self.online else None

    def log_step(self, step: int, metrics: StepMetrics) -> None:
        """Loss, its running mean over the epoch so far, lr and gradient norm at a step."""
        self._loss_sum += metrics.loss
        self._loss_steps += 1
        if self.run is not None:
            self.run.log(
                {
                    "global_step": step,
                    "train/loss": metrics.loss,
                    "train/loss_avg": self._loss_sum / self._loss_steps,
                    "train/lr": metrics.lr,
                    "train/grad_norm": metrics.grad_norm,
                }
            )

    def log_inputs(self, step: int, images: torch.Tensor) -> None:
        """One batch as the model sees it (augmented), de-normalised into a grid."""
        if self.run is not None:
            import wandb

            grid = sample_grid(images).permute(1, 2, 0).mul(255).round().byte().numpy()
            self.run.log({"global_step": step, "inputs": wandb.Image(grid, caption="inputs")})

    def log_epoch(self, result: EpochResult, grid: Path | None) -> None:
        """An epoch's mean loss, images/s, time and (when drawn) its sample grid."""
        self._loss_sum, self._loss_steps = 0.0, 0
        if self.run is not None:
            import wandb

            row: dict[str, Any] = {
                "global_step": result.global_step,
                "epoch": result.epoch,
                "epoch/loss": result.loss,
                "epoch/images_per_s": result.images_per_s,
                "epoch/seconds": result.seconds,
            }
            if grid is not None:
                row["samples"] = wandb.Image(str(grid), caption=f"epoch {result.epoch}")
            self.run.log(row)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation's metrics (eval/fid, eval/kid, eval/kid_std) at a step."""
        if self.run is not None:
            self.run.log({"global_step": step, **{f"eval/{k}": v for k, v in metrics.items()}})

    def finish(self, exit_code: int = 0) -> None:
        """End the W&B run with the process's exit status (0 = finished)."""
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


# ---- Prefect artifacts ------------------------------------------------------------------------


class RunArtifacts:
    """The flow run's UI artifacts: progress, per-epoch metrics, summary, W&B link.

    The metrics table holds every epoch of the run, across resumes: each row is also kept in
    the run folder (RunDir.metrics_file), and a finished run run again re-publishes it (a
    sweep reads its trials' results from this table; flows.sweep.trial_result)."""

    def __init__(self, run: RunDir, epochs_done: int, epochs: int) -> None:
        self.run, self.epochs = run, epochs
        self.rows = [row for row in run.metrics_rows() if row["epoch"] <= epochs_done]
        self.progress_id = create_progress_artifact(
            progress=100.0 * epochs_done / epochs,
            key=PROGRESS_KEY,
            description=f"epochs done of {epochs}",
        )

    def epoch_trained(self, result: EpochResult) -> None:
        """Keep the epoch's row in the run folder before its checkpoint is written, so a run
        killed in between resumes with it (a row past the newest checkpoint is dropped on
        resume, and written again when the epoch is)."""
        self.rows.append(
            {
                "epoch": result.epoch,
                "global_step": result.global_step,
                "loss": round(result.loss, 6),
                "lr": result.lr,
                "images_per_s": round(result.images_per_s, 1),
                "seconds": round(result.seconds, 2),
            }
        )
        self._write()

    def epoch_done(self, result: EpochResult, evaluation: dict[str, float] | None = None) -> None:
        """Advance the progress bar, add the epoch's FID/KID (when it was evaluated) to its row
        and re-publish the metrics table."""
        update_progress_artifact(self.progress_id, 100.0 * result.epoch / self.epochs)
        if evaluation:
            self.rows[-1].update({k: round(v, 6) for k, v in evaluation.items()})
            self._write()
        publish_metrics(self.rows)

    def _write(self) -> None:
        self.run.write_metrics(self.rows)


def publish_metrics(rows: list[dict[str, Any]]) -> None:
    """The per-epoch metrics table artifact (key epoch-metrics)."""
    create_table_artifact(rows, key=METRICS_KEY, description="per-epoch metrics")


def publish_image(path: Path, key: str, description: str) -> None:
    """An image artifact that shows the image at path in the Prefect UI, inline as a data: URI
    of at most IMAGE_BYTES (a PNG kept as it is, else a JPEG, downscaled where needed)."""
    media, data = web_image(path, IMAGE_BYTES)
    uri = f"data:{media};base64,{base64.b64encode(data).decode('ascii')}"
    create_image_artifact(image_url=uri, key=key, description=description)


def publish_samples(path: Path, epoch: int) -> None:
    """The epoch's sample grid as the image artifact `samples`, one version per grid."""
    publish_image(path, SAMPLES_KEY, f"samples after epoch {epoch}: `{path}`")


def publish_sweep_plot(path: Path, sweep: str, metric: str) -> None:
    """A sweep's plot (its metric per trial) as the image artifact `sweep-<name>-plot`."""
    publish_image(path, f"sweep-{sweep}-plot", f"sweep {sweep}: {metric} per trial, `{path}`")


def publish_summary(
    cfg: Settings, run: RunDir, summary: dict[str, Any], wandb_url: str | None
) -> None:
    """A markdown summary (settings digest, where grids and checkpoints are, the W&B run) and,
    when online, a link artifact to the W&B run."""
    lines = [
        f"# DDPM run `{run.name}`",
        "",
        f"- epochs: {summary['epochs']} of {cfg.train.epochs}, "
        f"global step {summary['global_step']}",
        f"- settings: `{run.settings_file}`",
        f"- checkpoints: `{run.checkpoints}` (last: `{summary['checkpoint']}`)",
        f"- sample grids: `{run.samples}`",
        f"- W&B: {wandb_url or 'offline/disabled (' + cfg.wandb.mode + ')'}",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| model | U-Net hidden {cfg.model.hidden_size}, {cfg.model.channels} channels |",
        f"| data | {cfg.data.dataset}, {cfg.data.image_size} px, subset {cfg.data.subset} |",
        f"| diffusion | T={cfg.diffusion.num_timesteps}, "
        f"betas {cfg.diffusion.beta_start}..{cfg.diffusion.beta_end} |",
        f"| optim | {cfg.optim.name} lr {cfg.optim.lr}, warm-up {cfg.optim.warmup_steps}, "
        f"{cfg.optim.schedule} |",
        f"| train | batch {cfg.train.batch_size}, seed {cfg.train.seed}, "
        f"EMA {cfg.train.ema_decay} |",
        f"| sample | {cfg.sample.sampler} ({cfg.sample.steps} steps), {cfg.sample.num} images |",
    ]
    if summary["metrics"]:
        lines.append(f"| last epoch loss | {summary['metrics']['loss']:.4f} |")
    create_markdown_artifact("\n".join(lines), key=SUMMARY_KEY, description="run summary")
    if wandb_url:
        create_link_artifact(wandb_url, link_text="W&B run", key=LINK_KEY)
