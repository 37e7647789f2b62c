"""The README's EDM and post-hoc EMA commands end to end: an edm run with train.ema_snapshots
(train_flow), `ddpm-ema --run RUN --sigma-rel ...` as a flow run on the test's Prefect server,
then sample_flow from a rebuilt checkpoint with a sampler on sigma."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from ddpm.checkpoint import load_checkpoint
from flows.sample_flow import sample_flow
from flows.train_flow import train_flow
from settings.sampling import GenerateOptions


def test_an_edm_run_rebuilds_ema_lengths_and_samples_from_them(
    tiny: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """train_flow with diffusion.formulation edm measures sigma_data into its checkpoints and
    writes post-hoc EMA snapshots; `ddpm-ema` writes one checkpoint per sigma_rel (a bad value
    is one line, exit 2); sample_flow draws from one with dpmpp_3m_karras."""
    overrides = {**tiny, "diffusion.formulation": "edm", "train.ema_snapshots": 4,
                 "train.epochs": 2}  # fmt: skip
    state = train_flow(overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    (run,) = Path(tiny["run.dir"]).iterdir()
    checkpoint = load_checkpoint(run / "checkpoints" / "epoch_002.pt")
    sigma_data = float(checkpoint["model"]["sigma_data"])
    assert 0.05 < sigma_data < 1.5 and checkpoint["architecture"]["diffusion"]["sigma_data"]
    assert len(list((run / "ema").glob("snapshot_*.pt"))) == 4
    command = Path(sys.executable).with_name("ddpm-ema")
    bad = subprocess.run([str(command), "--run", str(run), "--sigma-rel", "0.05,0.9"],
                         env=cli_env({}), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: --sigma-rel"), bad.stderr
    done = subprocess.run([str(command), "--run", str(run), "--sigma-rel", "0.05,0.12"],
                          env=cli_env({}), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rebuilt = run / "ema" / "sigma_rel_0.120.pt"
    assert load_checkpoint(rebuilt)["posthoc_ema"]["sigma_rel"] == 0.12
    images = tmp_path / "images"
    options = GenerateOptions(run=rebuilt, num=2, out=images, sampler="dpmpp_3m_karras", steps=4)
    drawn = sample_flow(options, return_state=True)
    assert drawn.is_completed(), drawn.message
    assert sorted(p.name for p in images.glob("*.png")) == ["000000.png", "000001.png"]
