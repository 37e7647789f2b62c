"""`train.devices 2`: train_flow as rank 0 of a real two-process gloo group on the CPU."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_run import Cli, signal_group

from ddpm.checkpoint import load_checkpoint
from ddpm.run_dir import RunDir
from flows.train_flow import train_flow

pytestmark = pytest.mark.slow


def run_folder(runs: str) -> RunDir:
    (path,) = Path(runs).iterdir()
    return RunDir(path)


def test_two_devices_make_one_run_one_wandb_run_and_one_set_of_grids(
    tiny: dict[str, Any],
) -> None:
    """Two processes train the run that one process would (same folder: train.devices does not
    name the run): one W&B run, one grid per epoch, epoch checkpoints that a one-process run
    resumes, and a one-process checkpoint that a two-process run resumes."""
    run = {**tiny, "train.devices": 2, "train.batch_size": 8, "wandb.mode": "offline"}
    first = train_flow(overrides=run, return_state=True)
    assert first.is_completed(), first.message
    folder = run_folder(tiny["run.dir"])
    assert [p.name for p in sorted(folder.samples.glob("*.png"))] == [
        "epoch_001.png",
        "epoch_002.png",
    ]
    assert len(list(folder.path.glob("wandb/offline-run-*"))) == 1
    assert [p.name for p in folder.epoch_checkpoints()] == ["epoch_001.pt", "epoch_002.pt"]

    alone = train_flow(overrides={**run, "train.devices": 1, "train.epochs": 3}, return_state=True)
    assert alone.result()["global_step"] == 24  # resumed after step 16: 8 more
    again = train_flow(overrides={**run, "train.epochs": 4}, return_state=True)
    assert again.result()["global_step"] == 32
    assert run_folder(tiny["run.dir"]).path == folder.path
    ids = {p.name.rsplit("-", 1)[1] for p in folder.path.glob("wandb/offline-run-*")}
    assert len(ids) == 1  # each resume continued the same W&B run
    last = load_checkpoint(folder.epoch_checkpoints()[-1])
    assert last["epoch"] == 4 and all(torch.isfinite(t).all() for t in last["model"].values())


def test_killed_rank_fails_the_run_within_60_s_naming_it_and_a_rerun_finishes(
    tiny: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """SIGKILL of rank 1 mid-epoch: rank 0 fails the run at its next step, naming rank 1, long
    before train.rank_timeout (300 s); the same command then resumes and finishes."""
    run = {
        **tiny,
        "data.subset": 80,
        "train.devices": 2,
        "train.batch_size": 8,  # 10 steps per epoch
        "train.epochs": 3,
        "sample.every": 0,
    }
    cli = Cli(cli_env(run), tmp_path)
    cli.wait_for(lambda line: "rank 1: pid" in line)
    pid = int(re.search(r"rank 1: pid (\d+)", cli.output)[1])
    cli.wait_for_step(14)  # in the middle of epoch 2
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    code = cli.finish(timeout=120)
    waited = time.monotonic() - killed
    assert code == 1, cli.output[-3000:]
    assert waited < 60
    last = cli.output.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 (pid") and "SIGKILL" in last, last

    rerun = Cli(cli_env(run), tmp_path)
    assert rerun.finish(timeout=240) == 0, rerun.output[-3000:]
    assert "resumed after step 10" in rerun.output
    assert load_checkpoint(run_folder(run["run.dir"]).epoch_checkpoints()[-1])["epoch"] == 3


def test_sigterm_stops_the_whole_group_after_a_step_with_a_checkpoint(
    tiny: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """SIGTERM to the command (its process group, as a scheduler sends it; the follower runs in
    a session of its own) stops both ranks after the same step: exit 143, a mid-epoch
    checkpoint at that step, no follower left; the same command resumes from it."""
    run = {
        **tiny,
        "data.subset": 80,
        "train.devices": 2,
        "train.batch_size": 8,
        "train.epochs": 2,
        "sample.every": 0,
    }
    cli = Cli(cli_env(run), tmp_path)
    cli.wait_for(lambda line: "rank 1: pid" in line)
    follower = int(re.search(r"rank 1: pid (\d+)", cli.output)[1])
    cli.wait_for_step(13)
    signal_group(cli, signal.SIGTERM)
    assert cli.finish(timeout=120) == 128 + signal.SIGTERM, cli.output[-3000:]
    stopped = cli.last_step
    folder = run_folder(run["run.dir"])
    assert folder.step_checkpoints()[-1].name == f"step_{stopped:07d}.pt"
    with pytest.raises(ProcessLookupError):
        os.kill(follower, 0)

    rerun = Cli(cli_env(run), tmp_path)
    assert rerun.finish(timeout=240) == 0, rerun.output[-3000:]
    assert f"resumed after step {stopped}" in rerun.output
