"""Run-level operations: build and resume, checkpoint files, rewinding, datasets, samples."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_run import Calls

from ddpm.batches import TrainingData
from ddpm.build import build_or_resume, build_training, rewind
from ddpm.config import DataConfig
from ddpm.datasets import TensorImageDataset, load_dataset, locate_dataset
from ddpm.errors import DatasetError
from ddpm.generate import draw_samples
from ddpm.image_folders import ImageFolderDataset
from ddpm.run_dir import (
    RunDir,
    RunInUse,
    load_newest_valid,
    prune_checkpoints,
    save_epoch_checkpoint,
)
from ddpm.trainer import Trainer


@pytest.fixture
def config(tiny_config):
    return tiny_config()


@pytest.fixture
def data(tmp_path: Path, cifar_writer, config) -> TrainingData:
    """10 official-format CIFAR images (batches of 2), read as a run reads them."""
    path = cifar_writer(tmp_path / "cifar", 2)
    return TrainingData(load_dataset(config, path), config)


def weights(state) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in state.diffusion.parameters()])


def test_build_is_deterministic_from_the_seed(tiny_config) -> None:
    """Two builds with the same seed have identical weights; another seed differs."""
    config = tiny_config()
    assert torch.equal(weights(build_training(config, 100)), weights(build_training(config, 100)))
    other = build_training(tiny_config({"train.seed": 1}), 100)
    assert not torch.equal(weights(build_training(config, 100)), weights(other))


def test_trainer_counts_steps_and_calls_back_with_global_steps(data, config) -> None:
    """An epoch of 10 images at batch 4 is 3 steps; hooks see global steps 1..3, then 4..6;
    the results are typed, their counts integers."""
    state, seen = build_training(config, 100), []
    trainer = Trainer(state, data, config.train, hooks=Calls(lambda s, m: seen.append(s)))
    r1, r2 = trainer.epoch(), trainer.epoch()
    assert seen == [1, 2, 3, 4, 5, 6] and data.steps_per_epoch == 3
    assert (r1.epoch, r1.global_step, r1.steps, r2.epoch, r2.global_step) == (1, 3, 3, 2, 6)
    assert all(type(v) is int for v in (r2.epoch, r2.global_step, r2.steps, r2.images))
    assert (state.epoch, state.global_step, state.dirty) == (2, 6, False)


def test_after_step_runs_every_step_between_reads(data, tiny_config) -> None:
    """after_step (a progress bar's advance) runs once per step as it is queued, before the
    step metrics are read: with reads every 100 steps, all 3 come before the first read."""
    config = tiny_config({"train.log_every": 100})
    state, events = build_training(config, 100), []
    hooks = Calls(
        on_step=lambda s, m: events.append(("read", s)),
        after_step=lambda: events.append(("queued", state.epoch_step)),
    )
    Trainer(state, data, config.train, hooks=hooks).epoch()
    assert events == [("queued", 1), ("queued", 2), ("queued", 3)] + [
        ("read", s) for s in (1, 2, 3)
    ]


def test_checkpoints_are_listed_by_epoch_and_pruned(tmp_path: Path, config) -> None:
    """epoch_XXX.pt files sort by epoch (epoch 10 after 9), only the newest `keep` stay."""
    state, run = build_training(config, 100), RunDir(tmp_path)
    for epoch in (1, 2, 9, 10):
        state.epoch = epoch
        save_epoch_checkpoint(state.snapshot(), run, keep=10)
    (run.checkpoints / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in run.epoch_checkpoints()] == [
        "epoch_001.pt",
        "epoch_002.pt",
        "epoch_009.pt",
        "epoch_010.pt",
    ]
    removed = prune_checkpoints(run, keep=2)
    assert [p.name for p in removed] == ["epoch_001.pt", "epoch_002.pt"]
    assert [p.name for p in run.epoch_checkpoints()] == ["epoch_009.pt", "epoch_010.pt"]
    assert RunDir(tmp_path / "missing").epoch_checkpoints() == []


def test_run_dir_names_every_file_of_a_run(tmp_path: Path) -> None:
    """The run folder's layout, as users and tools find it."""
    run = RunDir(tmp_path / "run-1")
    assert run.settings_file == tmp_path / "run-1" / "settings.json"
    assert run.epoch_checkpoint(3) == tmp_path / "run-1" / "checkpoints" / "epoch_003.pt"
    assert run.step_checkpoint(400) == tmp_path / "run-1" / "checkpoints" / "step_0000400.pt"
    assert run.grid(12) == tmp_path / "run-1" / "samples" / "epoch_012.png"
    assert run.wandb_id_file.name == "wandb_id.txt" and run.name == "run-1"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_newest_checkpoint_falls_back_with_one_warning(
    tmp_path: Path, data, config, caplog, damage: str
) -> None:
    """A truncated or garbage newest checkpoint is skipped with one warning; the older is used."""
    state, run = build_training(config, 100), RunDir(tmp_path)
    Trainer(state, data, config.train).epoch()
    save_epoch_checkpoint(state.snapshot(), run, keep=3)
    Trainer(state, data, config.train).epoch()
    newest = save_epoch_checkpoint(state.snapshot(), run, keep=3)
    raw = newest.read_bytes()
    newest.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00" * 64)
    with caplog.at_level(logging.WARNING):
        path, checkpoint = load_newest_valid(run)
    assert path == run.epoch_checkpoint(1) and checkpoint["epoch"] == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "epoch_002.pt" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_resume_and_rewind(tmp_path: Path, data, config) -> None:
    """build_or_resume restores the newest checkpoint; rewind puts a mid-epoch state back to
    it, or to the initial weights when no checkpoint exists yet."""
    run = RunDir(tmp_path)
    fresh = build_or_resume(config, 100, run)
    assert (fresh.epoch, fresh.global_step) == (0, 0)
    initial = weights(fresh)
    Trainer(fresh, data, config.train).epoch()
    fresh.dirty = True  # as if epoch 2 had failed midway
    assert rewind(fresh, run) == "the initial weights"
    assert torch.equal(weights(fresh), initial) and fresh.epoch == 0 and not fresh.dirty

    Trainer(fresh, data, config.train).epoch()
    after_one = weights(fresh)
    save_epoch_checkpoint(fresh.snapshot(), run, keep=3)
    resumed = build_or_resume(config, 100, run)
    assert (resumed.epoch, resumed.global_step) == (1, 3)
    assert torch.equal(weights(resumed), after_one)
    Trainer(resumed, data, config.train).epoch()
    assert rewind(resumed, run) == str(run.epoch_checkpoint(1))
    assert torch.equal(weights(resumed), after_one) and resumed.global_step == 3


def test_stop_request_ends_the_epoch_between_steps_and_the_resume_is_exact(
    tmp_path: Path, data, config
) -> None:
    """A stop asked for after step 2 of a 3-step epoch: the epoch ends there, its state goes to
    step_0000002.pt, and resuming from that file ends epoch 2 bit for bit like a run that was
    never stopped (no step lost, none repeated)."""
    straight = build_training(config, 100)
    Trainer(straight, data, config.train).epoch()
    Trainer(straight, data, config.train).epoch()

    run = RunDir(tmp_path / "run")
    state, steps = build_or_resume(config, 100, run), []
    hooks = Calls(on_step=lambda s, m: steps.append(s), stop=lambda: len(steps) == 2)
    result = Trainer(state, data, config.train, run, hooks).epoch()
    assert result.stopped and (result.epoch, result.steps, result.global_step) == (1, 2, 2)
    assert (state.epoch, state.epoch_step, state.dirty) == (0, 2, False)
    assert run.step_checkpoints() == [run.step_checkpoint(2)]

    resumed = build_or_resume(config, 100, run)
    assert (resumed.epoch, resumed.global_step, resumed.epoch_step) == (0, 2, 2)
    first = Trainer(resumed, data, config.train).epoch()
    assert (first.epoch, first.steps, first.stopped) == (1, 1, False)
    Trainer(resumed, data, config.train).epoch()
    assert torch.equal(weights(resumed), weights(straight))
    for ours, theirs in zip(resumed.ema.parameters(), straight.ema.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_run_folder_lock_refuses_a_second_holder_and_dies_with_its_process(
    tmp_path: Path,
) -> None:
    """While a child process holds a run folder, locking it here fails at once naming the
    folder and the child's PID; once the child is SIGKILLed the lock is free (nothing stale)."""
    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; from ddpm.run_dir import RunDir\n"
            f"with RunDir({str(run.path)!r}).locked():\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        folder = re.escape(str(run.path))
        with pytest.raises(RunInUse, match=rf"{folder} is in use by process {holder.pid},"):
            run.locked().__enter__()
    finally:
        holder.kill()
        holder.wait()
    with run.locked():
        assert run.lock_file.read_text().strip() == str(os.getpid())


def test_subset_larger_than_the_data_names_the_setting(
    tmp_path: Path, cifar_writer, tiny_config
) -> None:
    """data.subset above the number of images is a DatasetError naming data.subset and the
    count found, not a ValueError from inside the sampler."""
    path = cifar_writer(tmp_path, 2)  # 10 images
    with pytest.raises(DatasetError, match=r"data\.subset is 512 but .* holds 10 images"):
        load_dataset(tiny_config({"data.subset": 512}), path)


def test_locate_dataset(tmp_path: Path, cifar_writer) -> None:
    """cifar10 finds the extracted folder; folder must exist; unknown kinds are refused."""
    cifar_writer(tmp_path)
    cifar = DataConfig(root=tmp_path, url="http://127.0.0.1:9/x")
    assert locate_dataset(cifar) == tmp_path / "cifar-10-batches-py"
    assert locate_dataset(DataConfig(dataset="folder", folder=tmp_path)) == tmp_path
    with pytest.raises(DatasetError, match=r"set data\.folder"):
        locate_dataset(DataConfig(dataset="folder", folder=tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown dataset"):
        locate_dataset(DataConfig(dataset="imagenet"))  # type: ignore[arg-type]


def test_load_dataset_subsets_and_folders(tmp_path: Path, cifar_writer, tiny_config) -> None:
    """A subset keeps N images; image folders load lazily with their own subset."""
    cifar = load_dataset(tiny_config({"data.subset": 7}), cifar_writer(tmp_path, 4))
    assert len(cifar) == 7
    for i in range(5):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    folder = load_dataset(tiny_config({"data.dataset": "folder", "data.subset": 3}), tmp_path)
    assert len(folder) == 3 and folder[0].shape == (3, 32, 32)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_samples_come_from_fixed_noise_and_leave_training_rng_alone(
    tiny_config, sampler: str
) -> None:
    """Two draws give identical grids, and the global RNG that training draws from is
    unchanged by sampling; the progress callback runs once per sampler step."""
    config = tiny_config({"sample.sampler": sampler})
    state, ticks = build_training(config, 100), []
    rng = torch.get_rng_state()
    a = draw_samples(state, config.sample, config.image_shape, 3, lambda: ticks.append(1))
    b = draw_samples(state, config.sample, config.image_shape, 3)
    assert torch.equal(a, b) and a.shape == (2, 3, 32, 32) and a.device.type == "cpu"
    assert torch.equal(torch.get_rng_state(), rng)
    assert state.diffusion.training  # the model is back in train mode
    assert len(ticks) == (20 if sampler == "ddpm" else 5)


def test_training_data_picks_device_resident_batches_for_in_memory_datasets(
    tmp_path: Path, tiny_config
) -> None:
    """auto keeps in-memory images on the device (no DataLoader) and reads image folders with
    a DataLoader; device with a folder is refused; both paths give the same batches."""
    images = TensorImageDataset(torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8))
    auto = TrainingData(images, tiny_config())
    via_loader = TrainingData(images, tiny_config({"data.loader": "dataloader"}))
    assert auto.on_device and not via_loader.on_device
    pairs = zip(auto.epoch(1), via_loader.epoch(1), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    for i in range(3):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / f"{i}.png")
    folder = ImageFolderDataset(tmp_path, 32)
    assert not TrainingData(folder, tiny_config()).on_device
    with pytest.raises(ValueError, match=r"data\.loader=device needs an in-memory dataset"):
        TrainingData(folder, tiny_config({"data.loader": "device"}))


def saved_run(folder: Path, config, epochs: int = 2) -> RunDir:
    """A run folder as a run leaves it: settings.json, metrics.jsonl (one row per epoch, the
    second evaluated), and an epoch checkpoint per epoch holding the settings and the rows so
    far (as train_flow saves them)."""
    run, state = RunDir(folder), build_training(config, 100, settings={"optim": {"lr": 0.5}})
    state.settings = {"optim": {"lr": 0.5}, "train": {"seed": 3}}
    rows = []
    for epoch in range(1, epochs + 1):
        state.epoch, state.global_step = epoch, 3 * epoch
        rows.append({"epoch": epoch, "loss": 1.0 / epoch, "global_step": 3 * epoch})
        if epoch == 2:
            rows[-1]["fid"] = 12.5
        save_epoch_checkpoint({**state.snapshot(), "metrics": [dict(r) for r in rows]}, run, 5)
    run.write_metrics(rows)
    (run.settings_file).write_text('{"optim": {"lr": 0.5}, "train": {"seed": 3}}\n')
    return run


@pytest.mark.parametrize("damage", [b"", b'{"optim": {"lr"', b"\x8b\x00\xff", b"[]"])
def test_damaged_settings_are_recovered_from_the_newest_checkpoint(
    tmp_path: Path, config, caplog, damage: bytes
) -> None:
    """A settings.json torn, emptied, binary or of the wrong type is read from the newest
    checkpoint's settings, with one warning naming the file; without a checkpoint it is
    None (a new run's, written again from the current settings), also with a warning. The
    damaged file is not changed by reading it."""
    run = saved_run(tmp_path / "run", config)
    run.settings_file.write_bytes(damage)
    with caplog.at_level(logging.WARNING):
        assert run.saved_settings() == {"optim": {"lr": 0.5}, "train": {"seed": 3}}
    assert f"{run.settings_file} is damaged" in caplog.text and "epoch_002.pt" in caplog.text
    assert run.settings_file.read_bytes() == damage
    for path in run.checkpoints.iterdir():
        path.unlink()
    assert run.saved_settings() is None


def test_damaged_metrics_rows_are_recovered_from_the_checkpoint_and_the_good_lines(
    tmp_path: Path, config, caplog
) -> None:
    """A metrics.jsonl with a torn line, or with a bit flipped where it still reads as JSON
    ("loss" as "locs": caught by its SHA-256), gets its rows back: those the newest checkpoint
    holds, then the file's good rows after it; without checkpoints, the good lines alone.
    One warning names the file and the source. Epoch 2's row, evaluated, keeps its FID."""
    run = saved_run(tmp_path / "run", config)
    good = run.metrics_file.read_text()
    assert run.metrics_rows()[1]["fid"] == 12.5  # read back as written, verified
    run.metrics_file.write_text(good.replace('"loss"', '"locs"', 1))
    with caplog.at_level(logging.WARNING):
        assert [r.get("loss") for r in run.metrics_rows()] == [1.0, 0.5]
    assert f"{run.metrics_file} is damaged (its SHA-256 differs" in caplog.text
    run.metrics_file.write_text(good.splitlines()[0][:7] + "\n" + good.splitlines()[1] + "\n"
                                + '{"epoch": 3, "loss": 0.3}\n')  # fmt: skip
    rows = run.metrics_rows()
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[1]["fid"] == 12.5
    assert rows[0] == {"epoch": 1, "loss": 1.0, "global_step": 3}
    for path in run.checkpoints.iterdir():
        path.unlink()
    assert [r["epoch"] for r in run.metrics_rows()] == [2, 3]


def test_a_damaged_best_record_is_recovered_from_the_metrics_rows(
    tmp_path: Path, config, caplog
) -> None:
    """best.json torn or without a FID is rebuilt from the metrics rows: the evaluated epoch
    with the lowest FID and its checkpoint's name, with a warning naming the file."""
    run = saved_run(tmp_path / "run", config)
    run.best_record.write_text('{"fid": 12.5, "epo')
    with caplog.at_level(logging.WARNING):
        best = run.best()
    assert best == {"fid": 12.5, "epoch": 2, "checkpoint": "epoch_002.pt"}
    assert f"{run.best_record} is damaged" in caplog.text
    run.best_record.write_text('{"epoch": 2}')
    assert run.best() == best
