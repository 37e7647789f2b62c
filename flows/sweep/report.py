"""What a sweep shows of its trials: one row per trial (the sweep's table artifact and its
last log line), a plot of the metric per trial, and both in a W&B run of the sweep's own."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path

from ddpm.files import atomic_write
from flows.sweep.record import Trial
from flows.tracking import resolve_wandb_mode, wandb_run_id
from settings import Settings
from settings.sweep import SweepSpec


def table_rows(spec: SweepSpec, trials: Mapping[int, Trial], folder: Path) -> list[dict]:
    """One row per trial: the settings that differ, the metric, best epoch, img/s, state,
    run folder and W&B run (its link when online; else where its offline files are)."""
    rows = []
    for trial in (trials[i] for i in sorted(trials)):
        wandb = trial.wandb or f"{spec.name}/{trial.name} (offline)"
        if spec.draws_samples:
            wandb = ""  # sample_flow's trials log to no W&B run
        rows.append(
            {
                "trial": trial.name,
                **trial.values,
                spec.metric: None if trial.metric is None else round(trial.metric, 6),
                "best_epoch": trial.best_epoch,
                "images_per_s": trial.images_per_s,
                "state": trial.state,
                "run_dir": str(folder / trial.name),
                "wandb": wandb,
                "note": trial.message,
            }
        )
    return rows


def text_table(rows: list[dict]) -> str:
    """The rows as aligned text (the sweep's last log line), without the notes."""
    if not rows:
        return "(no trials)"
    columns = [c for c in rows[0] if c not in ("run_dir", "wandb", "note")]
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns]
             for r in rows]  # fmt: skip
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def plot(spec: SweepSpec, trials: Mapping[int, Trial], path: Path) -> Path:
    """The metric of each trial by epoch (left) and its final value (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (by_epoch, final) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    names, values, colours = [], [], []
    colour = {"Completed": "tab:blue", "Pruned": "tab:orange"}
    for trial in (trials[i] for i in sorted(trials)):
        if trial.curve:
            epochs, metric = zip(*trial.curve, strict=True)
            by_epoch.plot(epochs, metric, marker="o", label=trial.name)
        names.append(trial.name)
        values.append(trial.metric if trial.metric is not None else math.nan)
        colours.append(colour.get(trial.state, "tab:red"))
    by_epoch.set(xlabel="epoch", ylabel=spec.metric, title=f"sweep {spec.name}: by epoch")
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(t.curve for t in trials.values()):
        by_epoch.legend(fontsize="small")
    final.bar(names, values, color=colours)
    final.set(ylabel=spec.metric, title="last value (orange: pruned, red: did not finish)")
    final.tick_params(axis="x", labelrotation=60, labelsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def log_to_wandb(cfg: Settings, spec: SweepSpec, folder: Path, rows: list[dict], png: Path) -> None:
    """The table and the plot in a W&B run `sweep-<name>` of the sweep's group (job type
    sweep), resumed across re-runs of the sweep."""
    mode = resolve_wandb_mode(cfg.wandb.mode)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(
        project=cfg.wandb.project, entity=cfg.wandb.entity, group=spec.name,
        name=f"sweep-{spec.name}", job_type="sweep", id=wandb_run_id(folder / "wandb_id.txt"),
        resume="allow", dir=os.environ.get("WANDB_DIR") or str(folder), mode=mode,
        config=spec.model_dump(mode="json"),
        settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False),
    )  # fmt: skip
    columns = list(rows[0]) if rows else []
    table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
    run.log({"sweep/trials": table, "sweep/plot": wandb.Image(str(png), caption=spec.metric)})
    run.finish()
