"""Generation from a trained run: the model from its checkpoint, per-image noise, files that
resume, the .npz, and best.pt following the lowest FID."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.build import build_training
from ddpm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ddpm.files import NotOurs
from ddpm.generate import generate, image_seed, load_trained_model, sample_set
from ddpm.images import GenerationError, ImageFiles, aligned_batches
from ddpm.run_dir import RunDir, keep_best, load_newest_valid, save_epoch_checkpoint
from ddpm.trainer import train_step


@pytest.fixture
def config(tiny_config):
    return tiny_config({"model.hidden_size": 16, "sample.steps": 4})


@pytest.fixture
def run(tmp_path: Path, config) -> RunDir:
    """A run folder with epoch checkpoints 1 and 2 of a briefly trained tiny model."""
    run = RunDir(tmp_path / "run")
    state = build_training(config, 100, settings={"note": "tiny"})
    for epoch in (1, 2):
        for _ in range(3):
            train_step(state, torch.rand(4, 3, 32, 32) * 2 - 1)
        state.epoch, state.global_step = epoch, 3 * epoch
        save_epoch_checkpoint(state.snapshot(), run, keep=3)
    return run


def draw(run: RunDir, config, indices: range, seed: int = 0) -> torch.Tensor:
    trained = load_trained_model(run.path)
    return generate(trained.diffusion, indices, trained.image_shape, config.sample, seed)


def test_image_seeds_are_distinct_and_stable() -> None:
    """image_seed is a pure function of (seed, index), 63 bits, distinct over many pairs."""
    seeds = {image_seed(s, i) for s in range(4) for i in range(2500)}
    assert len(seeds) == 10_000 and max(seeds) < 2**63
    assert image_seed(0, 7) == image_seed(0, 7) != image_seed(1, 7)


def test_loads_the_newest_checkpoint_with_ema_weights_by_default(run: RunDir) -> None:
    """A run folder gives its newest valid checkpoint; the EMA weights by default, the trained
    ones with use_ema=False; the network is in eval mode, without gradients."""
    state = load_checkpoint(run.epoch_checkpoint(2))
    trained = load_trained_model(run.path)
    raw = load_trained_model(run.path, use_ema=False)
    assert trained.checkpoint == run.epoch_checkpoint(2) and trained.global_step == 6
    assert trained.image_shape == (3, 32, 32) and trained.ema and not raw.ema
    ema = trained.diffusion.state_dict()
    for name, value in ema.items():
        assert torch.equal(value, state["ema"]["module." + name]), name
    assert torch.equal(raw.diffusion.state_dict()[name], state["model"][name])
    assert not torch.equal(ema[name], state["model"][name])  # the average differs
    assert not trained.diffusion.training
    assert not any(p.requires_grad for p in trained.diffusion.parameters())
    assert load_trained_model(run.epoch_checkpoint(1)).global_step == 3  # a file works too


def test_older_checkpoints_build_from_their_settings(run: RunDir, config, tmp_path) -> None:
    """A checkpoint written before the architecture was recorded is rebuilt from the settings
    saved in it; one with neither is refused naming the file; a missing path is named."""
    state = load_checkpoint(run.epoch_checkpoint(2))
    state.pop("architecture")
    state["settings"] = {
        "model": dataclasses.asdict(config.model),
        "diffusion": dataclasses.asdict(config.diffusion),
        "data": {"image_size": 32},
    }
    old = save_checkpoint(tmp_path / "old.pt", state)
    assert load_trained_model(old).image_shape == (3, 32, 32)
    state["settings"] = {}
    bare = save_checkpoint(tmp_path / "bare.pt", state)
    with pytest.raises(CheckpointError, match=r"bare\.pt records neither"):
        load_trained_model(bare)
    with pytest.raises(CheckpointError, match="nowhere: no such run folder"):
        load_trained_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_trained_model(tmp_path)


def test_a_checkpoint_samples_with_the_diffusion_it_was_trained_with(
    tiny_config, tmp_path: Path
) -> None:
    """A v-prediction cosine run's checkpoint rebuilds as v and cosine whatever today's
    defaults; one whose record predates diffusion.schedule and prediction (no such keys)
    rebuilds as linear and eps; resuming either into a model of the other kind is refused,
    naming the setting and the checkpoint's value."""
    config = tiny_config({"diffusion.prediction": "v", "diffusion.schedule": "cosine"})
    state = build_training(config, 10)
    path = save_checkpoint(tmp_path / "v.pt", state.snapshot())
    trained = load_trained_model(path)
    assert (trained.diffusion.prediction, trained.diffusion.schedule) == ("v", "cosine")
    old = state.snapshot()
    old["architecture"]["diffusion"] = {"num_timesteps": 20, "beta_start": 1e-4, "beta_end": 0.02}
    legacy = load_trained_model(save_checkpoint(tmp_path / "old.pt", old))
    assert (legacy.diffusion.prediction, legacy.diffusion.schedule) == ("eps", "linear")
    with pytest.raises(CheckpointError, match=r"v\.pt was trained with diffusion\.schedule='cos"):
        paper = tiny_config({"diffusion.schedule": "linear", "diffusion.prediction": "eps"})
        build_training(paper, 10).restore(load_checkpoint(path), str(path))
    x0_run = build_training(
        tiny_config({"diffusion.prediction": "x0", "diffusion.schedule": "linear"}), 10
    )
    with pytest.raises(CheckpointError, match=r"diffusion\.prediction='eps'; the current .* 'x0'"):
        x0_run.restore(old, "old.pt")


def test_an_image_depends_on_its_seed_and_index_alone(run: RunDir, config) -> None:
    """With aligned batches, images 0..3 of num=5 (one full batch of 4) are bit-identical to
    those of num=9, and image 4 (drawn alone for num=5, among 4 for num=9) is the same up to
    rounding; a repeat is identical; each image differs from the others and from another
    seed's."""
    trained = load_trained_model(run.path)
    args = (trained.diffusion, trained.image_shape, config.sample)
    five = sample_set(*args[:1], 5, *args[1:], seed=0, batch_size=4)
    nine = sample_set(*args[:1], 9, *args[1:], seed=0, batch_size=4)
    assert five.dtype == torch.uint8 and five.shape == (5, 3, 32, 32)
    assert torch.equal(five[:4], nine[:4])
    assert (five[4].int() - nine[4].int()).abs().max() <= 1
    assert torch.equal(five, sample_set(*args[:1], 5, *args[1:], seed=0, batch_size=4))
    assert len({bytes(img.numpy()) for img in nine}) == 9
    other = sample_set(*args[:1], 5, *args[1:], seed=1, batch_size=4)
    assert not torch.equal(other[0], five[0])
    # Another batch size puts image 2 among other neighbours: the noise is the same, so the
    # image is too, up to float rounding.
    two = sample_set(*args[:1], 5, *args[1:], seed=0, batch_size=2)
    assert (two.int() - five.int()).abs().max() <= 1


def test_batches_are_aligned_and_cut_at_num() -> None:
    """Batches cover [kB, (k+1)B), the last one cut at num: --num 64 with batches of 128 draws
    64 images, not 128."""
    assert list(aligned_batches(5, 2)) == [range(0, 2), range(2, 4), range(4, 5)]
    assert list(aligned_batches(64, 128)) == [range(0, 64)]


def test_files_resume_where_they_stopped(run: RunDir, config, tmp_path: Path) -> None:
    """Files are written once; after deleting some, only their batches are pending, and
    drawing them again gives byte-identical files; the .npz holds the same pixels, NHWC."""
    files = ImageFiles(tmp_path / "out", 6)
    for indices in files.pending_batches(4):
        assert files.write(indices, draw(run, config, indices)) == len(indices)
    assert sorted(p.name for p in files.folder.glob("*.png"))[-1] == "000005.png"
    assert not (files.folder / "000006.png").exists()
    before = {p.name: p.read_bytes() for p in files.folder.glob("*.png")}
    (files.folder / "000001.png").unlink()
    assert files.missing() == 1 and files.pending_batches(4) == [range(0, 4)]
    assert files.write(range(0, 4), draw(run, config, range(0, 4))) == 1
    assert {p.name: p.read_bytes() for p in files.folder.glob("*.png")} == before
    npz = files.write_npz()
    assert npz.name == "samples_6x32x32x3.npz"
    array = np.load(npz)["arr_0"]
    assert array.dtype == np.uint8 and array.shape == (6, 32, 32, 3)
    assert np.array_equal(array[3], files[3].permute(1, 2, 0).numpy())


def test_a_folder_drawn_another_way_is_refused(tmp_path: Path) -> None:
    """The first claim records the options; the same options resume, others are refused
    naming what changed; a folder holding files (PNGs or any other) without a record is
    not taken for ours, and is left as it was."""
    files = ImageFiles(tmp_path / "out", 3)
    files.claim({"seed": 0, "steps": 50})
    files.claim({"seed": 0, "steps": 50})
    with pytest.raises(GenerationError, match="seed: 0 -> 1"):
        files.claim({"seed": 1, "steps": 50})
    foreign = ImageFiles(tmp_path / "photos", 3)
    foreign.folder.mkdir()
    (foreign.folder / "cat.png").write_bytes(b"meow")
    (foreign.folder / "notes.txt").write_text("mine")
    with pytest.raises(NotOurs, match=r"photos \(--out\) holds files that are not images "
                       r"ddpm-sample drew \(cat.png, notes.txt\)"):  # fmt: skip
        foreign.claim({"seed": 0})
    assert sorted(p.name for p in foreign.folder.iterdir()) == ["cat.png", "notes.txt"]
    assert (foreign.folder / "cat.png").read_bytes() == b"meow"


def test_grayscale_images_round_trip(tmp_path: Path) -> None:
    """1-channel images are written as grayscale PNGs and read back as (1, H, W)."""
    files = ImageFiles(tmp_path / "gray", 2)
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    files.write(range(2), images)
    assert torch.equal(files[1], images[1])


def test_best_checkpoint_follows_the_lowest_fid(run: RunDir) -> None:
    """best.pt is the checkpoint of the lowest FID so far; it survives the pruning of its
    epoch file and loads with its checksum."""
    assert keep_best(run, run.epoch_checkpoint(1), 1, {"fid": 50.0})
    assert not keep_best(run, run.epoch_checkpoint(2), 2, {"fid": 60.0})
    assert load_checkpoint(run.best_checkpoint)["epoch"] == 1
    assert keep_best(run, run.epoch_checkpoint(2), 2, {"fid": 40.0})
    assert load_checkpoint(run.best_checkpoint)["epoch"] == 2
    run.epoch_checkpoint(2).unlink()
    assert load_checkpoint(run.best_checkpoint)["epoch"] == 2
    assert load_newest_valid(run)[0] == run.epoch_checkpoint(1)  # best.pt is not resumed from
