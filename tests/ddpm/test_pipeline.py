"""Run-level operations: build and resume, checkpoint files, rewinding, datasets, samples."""

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from ddpm.data import DatasetError, ImageFolderDataset, TensorImageDataset
from ddpm.pipeline import (
    build_or_resume,
    build_training,
    draw_samples,
    epoch_batch_source,
    epoch_checkpoint,
    list_checkpoints,
    load_dataset,
    load_newest_valid,
    locate_dataset,
    prune_checkpoints,
    rewind,
    run_epoch,
    save_epoch_checkpoint,
)

BUILD = dict(
    hidden_size=8,
    channels=3,
    num_timesteps=20,
    beta_start=1e-4,
    beta_end=0.02,
    optimizer="adam",
    lr=1e-3,
    momentum=0.9,
    weight_decay=0.0,
    warmup_steps=0,
    schedule="constant",
    total_steps=100,
    ema_decay=0.9,
    seed=0,
)
TRAIN = dict(batch_size=4, seed=0, random_flip=True, num_workers=0, grad_clip=1.0, device="cpu")


@pytest.fixture
def dataset(tmp_path: Path, cifar_writer):
    load_dataset.cache_clear()
    return load_dataset("cifar10", str(cifar_writer(tmp_path, 2)), 32, 3, 0, 0)


def weights(state) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in state.diffusion.parameters()])


def test_build_is_deterministic_from_the_seed() -> None:
    """Two builds with the same seed have identical weights; another seed differs."""
    assert torch.equal(weights(build_training(**BUILD)), weights(build_training(**BUILD)))
    assert not torch.equal(
        weights(build_training(**BUILD)), weights(build_training(**{**BUILD, "seed": 1}))
    )


def test_run_epoch_counts_steps_and_calls_back_with_global_steps(dataset) -> None:
    """An epoch of 10 images at batch 4 is 3 steps; callbacks see global steps 1..3, then 4..6."""
    state, seen = build_training(**BUILD), []
    m1 = run_epoch(state, dataset, 1, on_step=lambda s, m: seen.append(s), **TRAIN)
    m2 = run_epoch(state, dataset, 2, on_step=lambda s, m: seen.append(s), **TRAIN)
    assert seen == [1, 2, 3, 4, 5, 6]
    assert (m1["steps_per_epoch"], m2["epoch"], m2["global_step"]) == (3, 2, 6)
    assert (state.epoch, state.global_step, state.dirty) == (2, 6, False)


def test_checkpoints_are_listed_by_epoch_and_pruned(tmp_path: Path, dataset) -> None:
    """epoch_XXX.pt files sort by epoch (epoch 10 after 9), only the newest `keep` stay."""
    state = build_training(**BUILD)
    for epoch in (1, 2, 9, 10):
        save_epoch_checkpoint(state.snapshot(), tmp_path, epoch, keep=10)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "epoch_001.pt",
        "epoch_002.pt",
        "epoch_009.pt",
        "epoch_010.pt",
    ]
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["epoch_001.pt", "epoch_002.pt"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_009.pt", "epoch_010.pt"]
    assert list_checkpoints(tmp_path / "missing") == []


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_newest_checkpoint_falls_back_with_one_warning(
    tmp_path: Path, dataset, caplog, damage: str
) -> None:
    """A truncated or garbage newest checkpoint is skipped with one warning; the older is used."""
    state = build_training(**BUILD)
    run_epoch(state, dataset, 1, **TRAIN)
    save_epoch_checkpoint(state.snapshot(), tmp_path, 1, keep=3)
    run_epoch(state, dataset, 2, **TRAIN)
    newest = save_epoch_checkpoint(state.snapshot(), tmp_path, 2, keep=3)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with caplog.at_level(logging.WARNING):
        path, checkpoint = load_newest_valid(tmp_path)
    assert path == epoch_checkpoint(tmp_path, 1) and checkpoint["epoch"] == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "epoch_002.pt" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_resume_and_rewind(tmp_path: Path, dataset) -> None:
    """build_or_resume restores the newest checkpoint; rewind puts a mid-epoch state back to
    it, or to the initial weights when no checkpoint exists yet."""
    fresh = build_or_resume(tmp_path, **BUILD)
    assert (fresh.epoch, fresh.global_step) == (0, 0)
    initial = weights(fresh)
    fresh.dirty = True
    run_epoch(fresh, dataset, 1, **TRAIN)
    fresh.dirty = True  # as if epoch 2 had failed midway
    assert rewind(fresh, tmp_path) == "the initial weights"
    assert torch.equal(weights(fresh), initial) and fresh.epoch == 0 and not fresh.dirty

    run_epoch(fresh, dataset, 1, **TRAIN)
    after_one = weights(fresh)
    save_epoch_checkpoint(fresh.snapshot(), tmp_path, 1, keep=3)
    resumed = build_or_resume(tmp_path, **BUILD)
    assert (resumed.epoch, resumed.global_step) == (1, 3)
    assert torch.equal(weights(resumed), after_one)
    run_epoch(resumed, dataset, 2, **TRAIN)
    assert rewind(resumed, tmp_path) == str(epoch_checkpoint(tmp_path, 1))
    assert torch.equal(weights(resumed), after_one) and resumed.global_step == 3


def test_locate_dataset(tmp_path: Path, cifar_writer) -> None:
    """cifar10 finds the extracted folder; folder must exist; unknown kinds are refused."""
    cifar_writer(tmp_path)
    assert locate_dataset("cifar10", tmp_path, "http://127.0.0.1:9/x", None) == (
        tmp_path / "cifar-10-batches-py"
    )
    assert locate_dataset("folder", tmp_path, "", tmp_path) == tmp_path
    with pytest.raises(DatasetError, match=r"set data\.folder"):
        locate_dataset("folder", tmp_path, "", tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown dataset"):
        locate_dataset("imagenet", tmp_path, "", None)


def test_load_dataset_subsets_and_folders(tmp_path: Path, cifar_writer) -> None:
    """A subset keeps N images; image folders load lazily with their own subset."""
    load_dataset.cache_clear()
    cifar = load_dataset("cifar10", str(cifar_writer(tmp_path, 4)), 32, 3, 7, 0)
    assert len(cifar) == 7
    for i in range(5):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    folder = load_dataset("folder", str(tmp_path), 32, 3, 3, 0)
    assert len(folder) == 3 and folder[0].shape == (3, 32, 32)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samples_come_from_fixed_noise_and_leave_training_rng_alone(sampler: str) -> None:
    """Two draws give identical grids, and the global RNG that training draws from is
    unchanged by sampling."""
    state = build_training(**BUILD)
    kwargs = dict(
        num=2, image_shape=(3, 32, 32), sampler=sampler, steps=5, seed=3, use_ema=True, device="cpu"
    )
    rng = torch.get_rng_state()
    a, b = draw_samples(state, **kwargs), draw_samples(state, **kwargs)
    assert torch.equal(a, b) and a.shape == (2, 3, 32, 32) and a.device.type == "cpu"
    assert torch.equal(torch.get_rng_state(), rng)
    assert state.diffusion.training  # the model is back in train mode


def test_batch_source_picks_device_resident_data_for_in_memory_datasets(tmp_path: Path) -> None:
    """auto keeps in-memory images on the device (no DataLoader) and reads image folders with
    a DataLoader; device with a folder is refused; both paths give the same batches."""
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    kwargs = dict(device="cpu", batch_size=4, seed=0, random_flip=True, num_workers=0)
    dataset = TensorImageDataset(images)
    auto = epoch_batch_source(dataset, 1, loader="auto", **kwargs)
    assert auto.gi_code.co_name == "device_epoch_batches"
    via_loader = epoch_batch_source(dataset, 1, loader="dataloader", **kwargs)
    assert via_loader.gi_code.co_name == "epoch"  # EpochLoader.epoch
    assert all(torch.equal(a, b) for a, b in zip(auto, via_loader, strict=True))
    for i in range(3):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / f"{i}.png")
    folder = ImageFolderDataset(tmp_path, 32)
    assert epoch_batch_source(folder, 1, loader="auto", **kwargs).gi_code.co_name == "epoch"
    with pytest.raises(ValueError, match=r"data\.loader=device needs an in-memory dataset"):
        epoch_batch_source(folder, 1, loader="device", **kwargs)
