"""ema_flow: posthoc-ema, EMA lengths chosen after training (EDM2's post-hoc EMA).

    python flows/ema_flow.py --run runs/NAME --sigma-rel 0.05,0.10,0.15

rebuilds, from the snapshots a run trained with train.ema_snapshots wrote, the EMA of each
sigma_rel as the checkpoint runs/NAME/ema/sigma_rel_0.050.pt, ... (ddpm.posthoc); sample,
evaluate, export or sweep them as any checkpoint (`ddpm-sample --run runs/NAME/ema/...`).
"""

if __name__ == "__main__":
    import sys

    from flows.cli import ema_main

    sys.exit(ema_main())

from pathlib import Path

from prefect import flow, get_run_logger, task

from ddpm.posthoc import posthoc_ema
from ddpm.run_dir import RunDir

__all__ = ["ema_flow"]


@task(name="posthoc-ema")
def posthoc_ema_task(run: str, sigma_rels: list[float]) -> list[str]:
    """Rebuild each EMA length of the run as a checkpoint; returns their paths."""
    written = [str(p) for p in posthoc_ema(RunDir(Path(run)), sigma_rels)]
    for s, path in zip(sigma_rels, written, strict=True):
        get_run_logger().info("sigma_rel %.3f: %s", s, path)
    return written


@flow(name="ema-flow")
def ema_flow(run: str, sigma_rels: list[float]) -> list[str]:
    """Rebuild EMA lengths of a run folder after training (post-hoc EMA).

    Args:
        run: a run folder trained with train.ema_snapshots.
        sigma_rels: the EMA lengths, each in (0, 0.288): the EMA's spread relative to the run.
    """
    return posthoc_ema_task(str(Path(run).resolve()), [float(s) for s in sigma_rels])
