"""Checkpoints: exact resume, atomic writes, safe loads; sample grids as PNG, and for a web page."""

import io
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from ddpm.batches import EpochLoader
from ddpm.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from ddpm.config import OptimConfig
from ddpm.datasets import TensorImageDataset
from ddpm.diffusion import DiffusionModel
from ddpm.images import save_grid, web_image
from ddpm.trainer import train_step
from ddpm.training import (
    EMA,
    TrainingState,
    build_lr_scheduler,
    build_optimizer,
    seed_everything,
)
from ddpm.unet import UNet

DATA = TensorImageDataset(
    torch.randint(
        0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
)


def build(seed: int) -> TrainingState:
    """A full training setup: model, AdamW, warm-up + cosine, EMA, clipping, seeded by `seed`."""
    seed_everything(seed, deterministic=False)
    model = DiffusionModel(UNet(3, 3, hidden_size=8), num_timesteps=50)
    opt = build_optimizer(model.parameters(), OptimConfig(name="adamw", lr=1e-3, weight_decay=0.01))
    sched = build_lr_scheduler(opt, warmup_steps=3, total_steps=12, schedule="cosine")
    return TrainingState(model, opt, sched, EMA(model, decay=0.9), grad_clip=1.0)


def batches(epochs: range):
    for epoch in epochs:
        yield from EpochLoader(DATA, 4, seed=0).epoch(epoch)


def train(setup: TrainingState, epochs: range) -> None:
    for x0 in batches(epochs):
        train_step(setup, x0)


def flat(setup: TrainingState) -> dict[str, torch.Tensor]:
    state = setup.snapshot()
    return {
        "model": torch.cat([v.flatten().float() for v in state["model"].values()]),
        "ema": torch.cat([v.flatten().float() for v in state["ema"].values()]),
        "adam": torch.cat(
            [s["exp_avg_sq"].flatten() for s in state["optimizer"]["state"].values()]
        ),
        "lr": torch.tensor(setup.optimizer.param_groups[0]["lr"]),
    }


def test_resume_is_exact(tmp_path: Path) -> None:
    """N steps, save, load into fresh objects (other seed), M steps == N+M steps in one go:
    model, EMA, optimizer state and lr bit-identical (CPU)."""
    straight = build(0)
    train(straight, range(0, 4))

    first = build(0)
    train(first, range(0, 2))
    first.epoch, first.global_step, first.settings = 2, 6, {"a": 1}
    path = save_checkpoint(tmp_path / "epoch_002.pt", first.snapshot())
    torch.rand(100)  # disturb the global RNG; the checkpoint must restore it
    resumed = build(99)
    state = load_checkpoint(path)
    resumed.restore(state, str(path))
    assert (state["epoch"], state["global_step"], state["settings"]) == (2, 6, {"a": 1})
    assert (resumed.epoch, resumed.global_step) == (2, 6)
    train(resumed, range(2, 4))

    a, b = flat(straight), flat(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_records_versions_and_is_cpu_only(tmp_path: Path) -> None:
    """A checkpoint holds the format, package and torch versions and only CPU tensors."""
    state = build(0).snapshot()
    assert state["versions"]["format"] == str(FORMAT_VERSION)
    assert state["versions"]["torch"] == torch.__version__
    tensors = [v for v in state["model"].values()] + [state["rng"]["torch"]]
    assert all(t.device.type == "cpu" for t in tensors)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c.pt", state))
    assert loaded["versions"] == state["versions"]


def test_snapshot_is_a_copy() -> None:
    """Training after taking a snapshot does not change the snapshot (it is handed to a writer)."""
    setup = build(0)
    state = setup.snapshot()
    before = {k: v.clone() for k, v in state["model"].items()}
    train(setup, range(0, 1))
    assert all(torch.equal(before[k], state["model"][k]) for k in before)


def test_pickle_payload_in_checkpoint_never_runs(tmp_path: Path, plant_pickle) -> None:
    """A .pt file carrying a pickled callable is refused by weights_only loading; it never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    plant_pickle(path, marker)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    assert not marker.exists()


def test_save_grid_writes_a_png(tmp_path: Path) -> None:
    """64 samples in [-1, 1] become one 8x8 PNG grid (32 px tiles, 2 px padding)."""
    path = save_grid(torch.rand(64, 3, 32, 32) * 2 - 1, tmp_path / "samples" / "epoch_001.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (8 * 34 + 2, 8 * 34 + 2)
    one = save_grid(-torch.ones(1, 1, 32, 32), tmp_path / "black.png")
    with Image.open(one) as img:
        assert img.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_web_image_keeps_a_png_that_fits_and_shrinks_one_that_does_not(tmp_path: Path) -> None:
    """A grid's PNG under the limit is kept byte for byte; a 64-image grid of noise (a PNG of
    about 200 KB) becomes a full-size JPEG under 128 KiB, and under 20 KB a half-size one."""
    torch.manual_seed(0)
    small = save_grid(torch.rand(4, 3, 32, 32) * 2 - 1, tmp_path / "small.png")
    assert web_image(small, 128 * 1024) == ("image/png", small.read_bytes())
    noise = save_grid(torch.rand(64, 3, 32, 32) * 2 - 1, tmp_path / "noise.png")
    assert noise.stat().st_size > 128 * 1024
    for limit, size in ((128 * 1024, 274), (20_000, 137)):
        media, data = web_image(noise, limit)
        assert media == "image/jpeg" and len(data) <= limit
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and img.size == (size, size)
