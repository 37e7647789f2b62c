"""Post-hoc EMA of a run (EDM2; the math in ddpm.phema): rebuild the EMA of any length from the
snapshots a run with train.ema_snapshots wrote to its ema/ folder, as checkpoints that
ddpm-sample, --evaluate, ddpm-export and the sweeps read like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddpm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ddpm.errors import UserError
from ddpm.phema import reconstruct, sigma_rel_to_gamma, solve_coefficients
from ddpm.run_dir import RunDir, load_newest_valid

__all__ = ["posthoc_checkpoint", "posthoc_ema"]

log = logging.getLogger(__name__)


def posthoc_checkpoint(run: RunDir, sigma_rel: float) -> Path:
    """ema/sigma_rel_0.070.pt: the checkpoint of one rebuilt EMA length."""
    return run.ema / f"sigma_rel_{sigma_rel:.3f}.pt"


def _snapshots(run: RunDir) -> list[tuple[int, float, dict[str, Any]]]:
    """(t, sigma_rel, weights) of every profile of every readable snapshot, oldest first; a
    damaged snapshot is named in a warning and left out (the solve uses the others)."""
    found = []
    for path in run.ema_snapshots():
        try:
            snapshot = load_checkpoint(path)
        except CheckpointError as err:
            log.warning("post-hoc EMA leaves out %s: %s", path, err)
            continue
        for s, profile in snapshot["profiles"].items():
            found.append((int(profile["t"]), float(s), profile["weights"]))
    return found


def posthoc_ema(run: RunDir, sigma_rels: Sequence[float]) -> list[Path]:
    """Rebuild the EMA of each sigma_rel at the run's last snapshot and write it as a checkpoint
    (posthoc_checkpoint): the run's newest valid checkpoint with its EMA weights replaced, and a
    `posthoc_ema` record (sigma_rel, the step t rebuilt at, the snapshots used).

    Raises:
        UserError: naming the run, if it has no snapshots (trained without
            train.ema_snapshots) or fewer profiles than the solve needs; or a sigma_rel out of
            range.
        CheckpointError: if the run has no valid checkpoint to write beside.
    """
    for s in sigma_rels:
        try:
            sigma_rel_to_gamma(s)
        except ValueError as err:
            raise UserError(f"--sigma-rel {s}: {err}") from None
    found = _snapshots(run)
    if len({(t, s) for t, s, _ in found}) < 2:
        raise UserError(
            f"{run.path} has {len(found)} post-hoc EMA profiles in {run.ema}; train it with "
            "train.ema_snapshots (e.g. 16) to rebuild EMA lengths after training"
        )
    newest = load_newest_valid(run)
    if newest is None:
        raise CheckpointError(f"{run.path} holds no valid checkpoint to rebuild the EMA beside")
    source, checkpoint = newest
    t_end = max(t for t, _, _ in found)
    written = []
    for s in sigma_rels:
        coefficients = solve_coefficients([(t, p) for t, p, _ in found], (t_end, s))
        weights = reconstruct([w for _, _, w in found], coefficients)
        ema = dict(checkpoint.get("ema") or {})
        ema.update({f"module.{name}": value for name, value in weights.items()})
        record = {"sigma_rel": s, "t": t_end, "snapshots": len(found), "from": str(source)}
        state = {**checkpoint, "ema": ema, "posthoc_ema": record}
        written.append(save_checkpoint(posthoc_checkpoint(run, s), state))
        log.info("post-hoc EMA sigma_rel %.3f at step %d from %d profiles: %s", s, t_end,
                 len(found), written[-1])  # fmt: skip
    return written
