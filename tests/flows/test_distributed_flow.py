"""`train.devices 2`: two real processes on the CPU (gloo), started, watched and restarted by
torch's elastic launcher; rank 0 runs train_flow."""

from __future__ import annotations

import os
import re
import signal
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


@pytest.mark.slow(seconds=40)
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


def rank_pid(cli: Cli, rank: int) -> int:
    """The pid rank `rank` announced, once it has (the newest announcement: after a restart)."""
    pattern = rf"rank {rank} \(pid (\d+)\) joined" if rank else r"this is rank 0 \(pid (\d+)\)"
    cli.wait_for(lambda line: re.search(pattern, line) is not None)
    return int(re.findall(pattern, cli.output)[-1])


def two_ranks(tiny: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The command-line runs' settings: 2 CPU processes, 80 images in batches of 8 (10 steps
    per epoch), no grids; `changes` as dotted keys with `__` for the dot."""
    return {
        **tiny, "data.subset": 80, "train.devices": 2, "train.batch_size": 8,
        "sample.every": 0, **{k.replace("__", "."): v for k, v in changes.items()},
    }  # fmt: skip


@pytest.mark.slow(seconds=40)
def test_a_killed_rank_is_restarted_and_the_run_finishes_as_if_never_killed(
    tiny: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """SIGKILL of rank 1 mid-epoch: torch's launcher restarts the group, which resumes from the
    newest mid-epoch checkpoint and finishes by itself (exit 0), in one run folder and one W&B
    run; it repeats at most run.checkpoint_every steps, and its final weights and EMA equal
    those of the same run never killed (measured: identical)."""
    run = two_ranks(tiny, train__epochs=3, run__checkpoint_every=3, wandb__mode="offline")
    cli = Cli(cli_env(run), tmp_path)
    killed = rank_pid(cli, 1)
    cli.wait_for_step(14)  # in the middle of epoch 2
    os.kill(killed, signal.SIGKILL)
    before = cli.last_step
    assert cli.finish(timeout=300) == 0, cli.output[-3000:]
    resumed = [int(n) for n in re.findall(r"resumed after step (\d+)", cli.output)]
    assert len(resumed) == 1 and before - resumed[0] <= 3, (before, resumed)
    assert rank_pid(cli, 1) != killed
    folder = run_folder(run["run.dir"])
    ids = {p.name.rsplit("-", 1)[1] for p in folder.path.glob("wandb/offline-run-*")}
    assert len(ids) == 1  # the restarted rank 0 resumed the same W&B run
    kept = load_checkpoint(folder.epoch_checkpoints()[-1])

    never = train_flow(overrides={**run, "run.dir": f"{run['run.dir']}-never"}, return_state=True)
    assert never.is_completed(), never.message
    clean = load_checkpoint(run_folder(f"{run['run.dir']}-never").epoch_checkpoints()[-1])
    assert kept["global_step"] == clean["global_step"] == 30
    for part in ("model", "ema"):
        for name, value in clean[part].items():
            assert torch.equal(kept[part][name], value), name


def test_when_the_restarts_are_spent_the_run_fails_naming_the_killed_rank(
    tiny: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """With train.max_restarts 0, SIGKILL of rank 1 ends the run: exit 1 and one last line
    naming rank 1, its pid and the signal; the same command then resumes and finishes."""
    run = two_ranks(tiny, train__epochs=2, train__max_restarts=0)
    cli = Cli(cli_env(run), tmp_path)
    pid = rank_pid(cli, 1)
    cli.wait_for_step(4)
    os.kill(pid, signal.SIGKILL)
    assert cli.finish(timeout=120) == 1, cli.output[-3000:]
    last = cli.output.strip().splitlines()[-1]
    assert last.startswith(f"error: rank 1 (pid {pid}) was killed by SIGKILL;"), last
    assert "train.max_restarts = 0" in last, last

    rerun = Cli(cli_env(run), tmp_path)
    assert rerun.finish(timeout=240) == 0, rerun.output[-3000:]
    assert load_checkpoint(run_folder(run["run.dir"]).epoch_checkpoints()[-1])["epoch"] == 2


def test_sigterm_stops_the_whole_group_after_a_step_with_a_checkpoint(
    tiny: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """SIGTERM to the command (its process group, as a scheduler sends it; the launcher's ranks
    run in sessions of their own, and it passes the signal on) stops both ranks after the same
    step: exit 143, a mid-epoch checkpoint at that step, no rank left; the same command
    resumes from it."""
    run = two_ranks(tiny, train__epochs=2)
    cli = Cli(cli_env(run), tmp_path)
    follower = rank_pid(cli, 1)
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


@pytest.mark.slow(seconds=40)
def test_two_devices_train_from_the_folder_rank_0_prepared(tiny: dict[str, Any]) -> None:
    """data.prepare=auto with train.devices 2: rank 0 prepares the image folder and rank 1
    reads the prepared copy rank 0 names (reading it as an image folder finds no images and
    fails the run)."""
    from PIL import Image

    images = Path(tiny["run.dir"]).parent / "images"
    images.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(32):
        pixels = torch.randint(0, 256, (40, 40, 3), generator=rng, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(images / f"{i:02d}.png")
    run = {**tiny, "data.dataset": "folder", "data.folder": str(images), "data.subset": 0,
           "train.devices": 2, "train.batch_size": 8, "train.epochs": 1}  # fmt: skip
    state = train_flow(overrides=run, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["global_step"] == 4
    assert len(list((Path(tiny["data.root"]) / "prepared").iterdir())) == 1
