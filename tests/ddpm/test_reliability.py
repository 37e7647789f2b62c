"""Crash safety at the core: checksums, hostile and incompatible checkpoints, failed writes,
non-finite losses, and exact resume from a mid-epoch checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import signal
from pathlib import Path

import pytest
import torch
from tiny_run import Calls, make_config, train_on
from torch import nn

from ddpm.batches import TrainingData
from ddpm.build import build_or_resume, build_training
from ddpm.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    checksum_path,
    load_checkpoint,
    save_checkpoint,
)
from ddpm.config import OptimConfig
from ddpm.datasets import TensorImageDataset
from ddpm.diffusion import DiffusionModel
from ddpm.run_dir import RunDir, load_newest_valid, save_epoch_checkpoint
from ddpm.trainer import Trainer, TrainingDiverged
from ddpm.training import EMA, TrainingState, build_optimizer
from ddpm.unet import UNet

CONFIG_CHANGES = {"optim.warmup_steps": 2, "optim.schedule": "cosine"}
CONFIG = make_config(CONFIG_CHANGES)
TOTAL_STEPS = 40
DATA = TrainingData(
    TensorImageDataset(
        torch.randint(
            0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
    ),
    CONFIG,
)


def weights(state) -> torch.Tensor:
    return torch.cat(
        [p.detach().flatten() for p in state.diffusion.parameters()]
        + [p.detach().flatten() for p in state.ema.parameters()]
    )


def two_epochs(run: RunDir):
    """Train and checkpoint epochs 1 and 2; returns the state."""
    state = build_training(CONFIG, TOTAL_STEPS)
    for _ in (1, 2):
        Trainer(state, DATA, CONFIG.train).epoch()
        save_epoch_checkpoint(state.snapshot(), run, keep=5)
    return state


def test_bit_flip_is_caught_by_the_checksum(tmp_path: Path, caplog) -> None:
    """One flipped byte inside the newest checkpoint's tensor data (which torch.load would
    accept) fails its SHA-256; one warning names it and the older checkpoint is used."""
    run = RunDir(tmp_path)
    two_epochs(run)
    newest = run.epoch_checkpoint(2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        path, state = load_newest_valid(run)
    assert path == run.epoch_checkpoint(1) and state["epoch"] == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "epoch_002.pt" in warning and "SHA-256" in warning


def test_planted_pickle_is_refused_and_the_previous_checkpoint_used(
    tmp_path: Path, plant_pickle
) -> None:
    """A newest 'checkpoint' holding a pickled payload that would create a file is refused by
    weights_only loading: the file never appears and resume uses the previous checkpoint."""
    run = RunDir(tmp_path)
    two_epochs(run)
    marker = tmp_path / "pwned"
    plant_pickle(run.epoch_checkpoint(3), marker)
    resumed = build_or_resume(CONFIG, TOTAL_STEPS, run)
    assert resumed.epoch == 2 and not marker.exists()


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path: Path) -> None:
    """Resuming with another hidden_size names the checkpoint and both shapes instead of a
    load_state_dict traceback; another state format names both versions."""
    run = RunDir(tmp_path)
    two_epochs(run)
    wider = make_config({**CONFIG_CHANGES, "model.hidden_size": 16})
    with pytest.raises(CheckpointError, match=r"epoch_002\.pt holds a different model") as err:
        build_or_resume(wider, TOTAL_STEPS, run)
    assert "model.hidden_size" in str(err.value) and "(8," in str(err.value)
    state = load_checkpoint(run.epoch_checkpoint(2))
    state["versions"]["format"] = "0"
    save_checkpoint(run.epoch_checkpoint(3), {**state, "global_step": 99})
    with pytest.raises(CheckpointError, match=r"epoch_003\.pt was written by checkpoint format"):
        build_or_resume(CONFIG, TOTAL_STEPS, run)


def test_disk_full_fails_loudly_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """A write that hits a full disk (a 64 KiB file-size limit) raises, leaves the previous
    checkpoint and its checksum intact, and leaves no partial file."""
    run = RunDir(tmp_path)
    state = two_epochs(run)
    folder = run.checkpoints
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointError, match=r"could not write checkpoint .*epoch_003\.pt"):
            state.epoch = 3
            save_epoch_checkpoint(state.snapshot(), run, keep=5)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    after = {
        p.name: p.read_bytes()
        for p in folder.iterdir()
        if p.suffix != ".sha256" or p.name != "epoch_003.pt.sha256"
    }
    assert {k: v for k, v in after.items() if k in before} == before
    assert not run.epoch_checkpoint(3).exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert load_newest_valid(run)[1]["epoch"] == 2


def test_background_writer_reraises_a_failed_write(tmp_path: Path) -> None:
    """A write that fails on the writer thread is raised at the next wait, not swallowed."""
    writer = CheckpointWriter()

    def fail() -> None:
        raise PermissionError("read-only checkpoint folder")

    writer.submit(fail)
    with pytest.raises(PermissionError, match="read-only"):
        writer.wait()
    writer.close()


class NaNAfter(nn.Module):
    """Wraps an eps model; returns NaN from the calls listed in `bad` (0-based)."""

    def __init__(self, inner: nn.Module, bad: set[int]) -> None:
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.inner(x, t)
        self.calls += 1
        return out * math.nan if self.calls - 1 in self.bad else out


def test_nan_steps_are_skipped_and_counted() -> None:
    """Steps whose loss is NaN change no weight and are counted; training goes on."""
    torch.manual_seed(0)
    model = DiffusionModel(NaNAfter(UNet(3, 3, 8), bad={1, 2}), num_timesteps=20)
    opt = build_optimizer(model.parameters(), OptimConfig(name="adam", lr=1e-3))
    seen = []
    snapshots = []

    def on_step(i: int, m) -> None:
        seen.append(m.skipped)
        snapshots.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))

    batches = [torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(5)]
    result = train_on(TrainingState(model, opt), batches, Calls(on_step), max_bad_steps=2)
    assert seen == [False, True, True, False, False] and result.bad_steps == 2
    assert torch.equal(snapshots[0], snapshots[1]) and torch.equal(snapshots[1], snapshots[2])
    assert not torch.equal(snapshots[2], snapshots[3])
    assert math.isfinite(result.loss)


def test_a_skipped_step_changes_nothing_without_reading_the_device() -> None:
    """With a fused optimizer the skip is a device-side flag: a NaN step leaves the weights,
    Adam's moments and step counts, and the EMA (n_averaged included) bit-identical, and
    training then goes on; the host-checked (unfused) path behaves the same."""

    def run(fused: bool) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
        torch.manual_seed(0)
        model = DiffusionModel(NaNAfter(UNet(3, 3, 8), bad={1}), num_timesteps=20)
        optimizer = build_optimizer(
            model.parameters(), OptimConfig(name="adam", lr=1e-3), fused=fused
        )
        ema = EMA(model, decay=0.9)
        after = []

        def keep() -> None:
            after.append(
                {
                    "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
                    "moments": torch.cat(
                        [s["exp_avg"].flatten() for s in optimizer.state.values()]
                    ),
                    "steps": torch.stack([s["step"].float() for s in optimizer.state.values()]),
                    "ema": torch.cat([p.flatten() for p in ema.module.parameters()]),
                    "n_averaged": ema.n_averaged.clone(),
                }
            )

        skipped = []
        batches = [torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(4)]
        train_on(
            TrainingState(model, optimizer, ema=ema, grad_clip=1.0),
            batches,
            Calls(on_step=lambda i, m: skipped.append(m.skipped), after_step=keep),
            log_every=4,
        )
        return after, skipped

    for fused in (True, False):
        after, skipped = run(fused)
        assert skipped == [False, True, False, False]
        assert all(torch.equal(after[0][k], after[1][k]) for k in after[0])
        assert [s["steps"].max().item() for s in after] == [1, 1, 2, 3]
        assert [s["n_averaged"].item() for s in after] == [1, 1, 2, 3]
        assert not torch.equal(after[1]["weights"], after[2]["weights"])
        assert not torch.equal(after[1]["ema"], after[2]["ema"])


def test_too_many_nan_steps_in_a_row_fail_clearly() -> None:
    """More than max_bad_steps non-finite steps in a row raise TrainingDiverged naming it."""
    torch.manual_seed(0)
    model = DiffusionModel(NaNAfter(UNet(3, 3, 8), bad={2, 3, 4, 5}), num_timesteps=20)
    opt = build_optimizer(model.parameters(), OptimConfig(name="adam", lr=1e-3))
    batches = [torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(8)]
    with pytest.raises(TrainingDiverged, match=r"4 steps in a row .*train.max_bad_steps = 3"):
        train_on(TrainingState(model, opt), batches, max_bad_steps=3)


def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path: Path) -> None:
    """Mid-epoch checkpoints every 2 steps; resuming from one (fresh process state, other RNG
    state) and finishing gives bit-identical weights to the uninterrupted epochs."""
    straight = build_training(CONFIG, TOTAL_STEPS)
    for _ in (1, 2):
        Trainer(straight, DATA, CONFIG.train).epoch()

    train = dataclasses.replace(CONFIG.train, checkpoint_every=2)
    run = RunDir(tmp_path)
    first = build_training(CONFIG, TOTAL_STEPS)
    Trainer(first, DATA, train, run).epoch()
    save_epoch_checkpoint(first.snapshot(), run, keep=3)
    assert run.step_checkpoints() == []  # superseded by the epoch checkpoint
    # epoch 2, interrupted after its 3rd step (global step 8): checkpoints at 6 and 8 exist
    partial = build_or_resume(CONFIG, TOTAL_STEPS, run)

    def stop(step: int, _) -> None:
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(partial, DATA, train, run, Calls(on_step=stop)).epoch()
    assert [p.name for p in run.step_checkpoints()] == ["step_0000006.pt", "step_0000008.pt"]
    assert all(checksum_path(p).is_file() for p in run.step_checkpoints())
    torch.rand(1000)  # disturb the RNG: the checkpoint must restore it
    other_seed = make_config({**CONFIG_CHANGES, "train.seed": 5})
    resumed = build_or_resume(other_seed, TOTAL_STEPS, run)
    assert (resumed.epoch, resumed.epoch_step, resumed.global_step) == (1, 3, 8)
    Trainer(resumed, DATA, CONFIG.train).epoch()
    assert resumed.global_step == straight.global_step == 10
    assert torch.equal(weights(resumed), weights(straight))
