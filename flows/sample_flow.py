"""sample_flow: load-model -> generate-images -> [write-npz] -> [download -> evaluate-images].

    python flows/sample_flow.py --run runs/NAME --num 1000 --out samples/NAME [--evaluate]

draws images 000000.png ... from a trained run (its newest valid checkpoint, EMA weights), each
from noise seeded by (seed, index) alone; re-running the command resumes an interrupted
generation. The run's data, model and sampler settings come from its checkpoint; eval.* from
flags, the environment and .env. SIGTERM or Ctrl-C stops it between sampler steps.
"""

if __name__ == "__main__":
    import sys

    from flows.cli import sample_main

    sys.exit(sample_main())

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled, State
from prefect.utilities.annotations import quote

from ddpm.config import Config
from ddpm.errors import UserError
from ddpm.evaluation import inception_weights
from ddpm.generate import TrainedModel
from ddpm.images import ImageFiles
from ddpm.sigma_samplers import SIGMA_SAMPLERS
from flows.download import download_task
from flows.ema_flow import posthoc_ema_task
from flows.gpu import gpu_slot
from flows.sample_tasks import (
    evaluate_images_task,
    generate_images_task,
    load_model_task,
    sampler_steps,
    write_npz_task,
)
from flows.shutdown import StopRequest, active_stop_request
from flows.tracking import core_logs_routed, publish_metrics
from settings import core_config, load_settings
from settings.sampling import GenerateOptions, sampling_settings

__all__ = ["sample_flow"]

SUMMARY_KEY = "generation-summary"


@flow(name="sample-flow", description="Draw images from a trained DDPM run; score them.")
def sample_flow(
    options: GenerateOptions, overrides: dict[str, Any] | None = None
) -> dict[str, Any] | State:
    """Draw images 0 .. num-1 of a run into `out` (those already there are kept), then
    optionally write the .npz and score them.

    Args:
        options: what to draw, from which run, how and where to (GenerateOptions; a
            deployment run gives them as JSON, e.g. {"run": "runs/NAME", "num": 64,
            "out": "samples/NAME"}).
        overrides: dotted settings for the evaluation and the command (eval.*, run.debug...).

    Returns:
        the checkpoint, the folder, images written now and in all, the .npz and the metrics;
        a Cancelled state when a stop request ended it early.
    """
    with core_logs_routed():
        stop = active_stop_request() or StopRequest(load_settings(overrides).run.stop_timeout)
        with stop.signals_handled(), stop.watching_api(PREFECT_API_URL.value()):
            run = str(options.run)
            if options.sigma_rel is not None:  # the EMA of that length, rebuilt now
                (run,) = posthoc_ema_task(str(options.run.resolve()), [options.sigma_rel])
            trained = load_model_task(run, options.ema)
            config = core_config(sampling_settings(trained.settings, options, overrides))
            data_path = _training_images(trained, config) if options.evaluate else None
            files = ImageFiles(options.out, options.num)
            files.claim(_generation_record(trained, options, config))
            with gpu_slot(config.train.device):
                written = generate_images_task(
                    quote(trained), config, files, options.seed, options.batch_size, quote(stop)
                )
            summary: dict[str, Any] = {
                "checkpoint": str(trained.checkpoint),
                "out": str(Path(options.out)),
                "written": written,
                "images": options.num - files.missing(),
                "npz": None,
                "metrics": None,
            }
            if stop():
                return Cancelled(
                    message=f"{stop.reason}: {summary['images']} of {options.num} images in "
                    f"{options.out}; re-run to resume"
                )
            if options.npz:
                summary["npz"] = write_npz_task(files)
            if data_path is not None:
                with gpu_slot(config.train.device):
                    summary["metrics"] = evaluate_images_task(files, config, data_path)
                publish_metrics([{"epoch": trained.epoch, **summary["metrics"]}])
        _publish(summary)
        get_run_logger().info("%s", summary)
        return summary


def _training_images(trained: TrainedModel, config: Config) -> str:
    """Where the run's training images are (fetched if need be), and the Inception weights
    found, before anything is drawn.

    Raises:
        UserError: if the checkpoint records no settings, or the weights cannot be had.
    """
    if not trained.settings:
        raise UserError(
            f"{trained.checkpoint} records no settings: the training images to evaluate "
            "against are unknown"
        )
    inception_weights(config.eval.weights)
    where = config.data
    return download_task(
        where.dataset, str(where.root), where.url, where.folder and str(where.folder)
    )


def _generation_record(
    trained: TrainedModel, options: GenerateOptions, config: Config
) -> dict[str, Any]:
    """What makes the images in `out` what they are: a re-run must match it to add to them."""
    sample = config.sample
    on_sigma = {}  # the samplers on sigma's options (none for the timestep samplers' records)
    if sample.sampler in SIGMA_SAMPLERS:
        names = ("rho", "sigma_min", "sigma_max", "s_churn", "s_tmin", "s_tmax", "s_noise")
        on_sigma = {name: getattr(sample, name) for name in names}
    return {
        **on_sigma,
        "checkpoint": str(trained.checkpoint.resolve()),
        "global_step": trained.global_step,
        "ema": trained.ema,
        "seed": options.seed,
        "sampler": sample.sampler,
        "steps": sampler_steps(config),
        "eta": sample.eta if sample.sampler == "ddim" else None,
        "clip_denoised": sample.clip_denoised,
        "batch_size": options.batch_size,
        "precision": config.train.precision,
        "device": config.train.device.split(":")[0],
    }


def _publish(summary: dict[str, Any]) -> None:
    """A markdown summary in the Prefect UI."""
    lines = [
        f"# Images from `{summary['checkpoint']}`",
        "",
        f"- folder: `{summary['out']}` ({summary['images']} images, {summary['written']} new)",
        f"- npz: `{summary['npz']}`" if summary["npz"] else "- npz: not written",
    ]
    for name, value in (summary["metrics"] or {}).items():
        lines.append(f"- {name}: {value:.4g}")
    create_markdown_artifact("\n".join(lines), key=SUMMARY_KEY, description="generation summary")
