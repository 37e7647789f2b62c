"""Post-hoc EMA in a run (train.ema_snapshots, ddpm.posthoc): the loop snapshots the two
power-function EMAs into the run's ema/ folder, a checkpoint carries them so a resumed run goes
on exactly, and posthoc_ema writes checkpoints of any EMA length that sample like any other."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tiny_run import smooth_batch

from ddpm.build import build_training
from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.config import TrainConfig
from ddpm.errors import UserError
from ddpm.generate import load_trained_model
from ddpm.posthoc import posthoc_checkpoint, posthoc_ema
from ddpm.run_dir import RunDir, save_epoch_checkpoint
from ddpm.trainer import Trainer, list_batches

STEPS = 12


def trained(tiny_config, path: Path, snapshots: int = 4) -> tuple[RunDir, object]:
    """A tiny run of one 12-step epoch with train.ema_snapshots, its epoch checkpoint saved."""
    config = tiny_config({"train.ema_snapshots": snapshots})
    state = build_training(config, STEPS)
    run = RunDir(path)
    train = TrainConfig(log_every=1, device="cpu", ema_snapshots=snapshots)
    Trainer(state, list_batches([smooth_batch(i) for i in range(STEPS)]), train, run).epoch()
    save_epoch_checkpoint(state.snapshot(), run, 3)
    return run, state


def test_the_loop_snapshots_the_profiles_and_a_checkpoint_carries_them(
    tiny_config, tmp_path: Path
) -> None:
    """With train.ema_snapshots 4 over 12 steps the loop writes snapshots after steps 3, 6, 9
    and 12, each holding both profiles (t = the steps averaged); the epoch checkpoint holds the
    profiles, and a state restored from it has exactly the trained state's."""
    run, state = trained(tiny_config, tmp_path / "run")
    assert [p.name for p in run.ema_snapshots()] == [f"snapshot_{s:07d}.pt" for s in (3, 6, 9, 12)]
    last = load_checkpoint(run.ema_snapshots()[-1])
    assert set(last["profiles"]) == {"0.05", "0.1"}
    assert all(p["t"] == STEPS for p in last["profiles"].values())
    again = build_training(tiny_config({"train.ema_snapshots": 4}), STEPS)
    again.restore(load_checkpoint(run.epoch_checkpoint(1)), "epoch_001.pt")
    for s, profile in state.profiles.items():
        ours, theirs = profile.state_dict(), again.profiles[s].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    plain = build_training(tiny_config(), STEPS).snapshot()
    with pytest.raises(CheckpointError, match=r"train\.ema_snapshots"):
        again.restore(plain, "plain.pt")


def test_posthoc_ema_writes_checkpoints_of_any_length(tiny_config, tmp_path: Path) -> None:
    """posthoc_ema writes ema/sigma_rel_*.pt: asked for a profile it tracked (0.10 at the last
    snapshot) it returns that profile's weights; another length lies between; each loads and
    samples as a checkpoint with the rebuilt weights as its EMA."""
    run, state = trained(tiny_config, tmp_path / "run")
    paths = posthoc_ema(run, [0.10, 0.07])
    assert paths == [posthoc_checkpoint(run, 0.10), posthoc_checkpoint(run, 0.07)]
    tracked = state.profiles[0.10].module.state_dict()
    rebuilt = load_trained_model(paths[0]).diffusion.state_dict()
    for name, value in tracked.items():
        if value.is_floating_point():
            assert torch.allclose(rebuilt[name], value, rtol=1e-4, atol=1e-6), name
    other = load_trained_model(paths[1])
    assert load_checkpoint(paths[1])["posthoc_ema"]["sigma_rel"] == 0.07
    images = other.diffusion.sample(2, (3, 32, 32), "ddim", steps=3)
    assert images.isfinite().all()


def test_a_damaged_snapshot_is_named_and_left_out_and_no_snapshots_is_one_line(
    tiny_config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A torn snapshot is left out with a warning naming it (the others still solve); a run
    without snapshots, or a sigma_rel out of range, is refused in one line naming the fix."""
    run, _ = trained(tiny_config, tmp_path / "run")
    torn = run.ema_snapshots()[1]
    torn.write_bytes(torn.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert posthoc_ema(run, [0.08])
    assert torn.name in caplog.text
    plain = RunDir(tmp_path / "plain")
    with pytest.raises(UserError, match=r"train\.ema_snapshots"):
        posthoc_ema(plain, [0.1])
    with pytest.raises(UserError, match=r"sigma-rel 0\.3"):
        posthoc_ema(run, [0.3])
