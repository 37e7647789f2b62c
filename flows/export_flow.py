"""export_flow: export-folder, a run's checkpoint in the Hugging Face diffusers format.

    python flows/export_flow.py --run runs/NAME --out export/NAME [--no-ema]

writes a folder that `diffusers.DDPMPipeline.from_pretrained(folder)` loads (the assignment
network with `trust_remote_code=True`): the run's newest valid checkpoint, or a checkpoint file
such as checkpoints/best.pt, with its EMA weights unless --no-ema; safetensors and JSON only,
and a model card (README.md). See ddpm.export.
"""

if __name__ == "__main__":
    import sys

    from flows.cli import export_main

    sys.exit(export_main())

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from ddpm.export import export

__all__ = ["export_flow"]


@task(name="export-folder")
def export_task(run: str, out: str, use_ema: bool) -> dict[str, Any]:
    """Write the diffusers folder of a run's newest valid checkpoint (or of a checkpoint file)
    to out, reading the checkpoint once; returns what it wrote."""
    done = export(Path(run), Path(out), use_ema)
    get_run_logger().info(
        "exported %s (%s, %s weights, step %d) to %s", done.checkpoint, done.arch,
        "EMA" if done.ema else "trained", done.global_step, done.out,
    )  # fmt: skip
    return {"out": str(done.out), "checkpoint": str(done.checkpoint), "arch": done.arch,
            "ema": done.ema, "global_step": done.global_step}  # fmt: skip


@flow(name="export-flow")
def export_flow(run: str, out: str, use_ema: bool = True) -> dict[str, Any]:
    """Export a run (a run folder or a checkpoint file) to the diffusers folder out.

    Args:
        run: a run folder (its newest valid checkpoint) or a checkpoint file (best.pt).
        out: the folder to write (replaced when it exists).
        use_ema: the EMA weights (what the DDPM paper samples from); else the trained ones.
    """
    done = export_task(str(Path(run).resolve()), str(Path(out).resolve()), use_ema)
    create_markdown_artifact(
        key="export",
        markdown=f"Exported `{done['checkpoint']}` to `{done['out']}`: load it with "
        f'`DDPMPipeline.from_pretrained("{done["out"]}")`.',
        description="diffusers export",
    )
    return done
