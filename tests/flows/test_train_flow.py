"""train_flow end to end on tiny data under the Prefect test harness: task states, files,
caching, resume, retries, validation, tags, and the command line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from prefect import flow, get_client

import flows.train_tasks
from ddpm.checkpoint import load_checkpoint
from ddpm.run_dir import RunDir
from flows.gpu import GPU_SLOT, gpu_slot
from flows.train_flow import train_flow
from flows.train_tasks import (
    checkpoint_task,
    sample_and_log_task,
    train_epoch_task,
)

REPO = Path(__file__).resolve().parents[2]


def run(overrides: dict[str, Any]):
    """Run the flow; return (final state, the flow's result or None)."""
    state = train_flow(overrides=overrides, return_state=True)
    return state, (state.result() if state.is_completed() else None)


def files(folder: Path) -> dict[str, int]:
    """Every file under folder with its modification time (ns), but the run folders' lock
    files, which every launch rewrites with its PID."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.is_file() and p.name != "lock"
    }


def test_whole_flow_on_tiny_cifar(tiny: dict[str, Any], task_runs) -> None:
    """Every task completes; epoch checkpoints load with the right step; a grid per epoch."""
    state, summary = run(tiny)
    assert state.is_completed(), state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert {name: [r.state.type.value for r in rs] for name, rs in runs.items()} == {
        "download": ["COMPLETED"],
        "load-data": ["COMPLETED"],
        "build-model": ["COMPLETED"],
        "train-epoch": ["COMPLETED"] * 2,
        "checkpoint": ["COMPLETED"] * 2,
        "sample-and-log": ["COMPLETED"] * 2,
    }
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == Path(tiny["run.dir"]) and run_dir.name.startswith("run-")
    checkpoints = RunDir(run_dir).epoch_checkpoints()
    assert [p.name for p in checkpoints] == ["epoch_001.pt", "epoch_002.pt"]
    last = load_checkpoint(checkpoints[-1])
    assert (last["epoch"], last["global_step"]) == (2, 4)  # 64 images / batch 32
    assert last["settings"]["model"]["hidden_size"] == 16
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "epoch_001.png",
        "epoch_002.png",
    ]
    assert (run_dir / "settings.json").is_file()
    assert summary["epochs"] == 2 and summary["global_step"] == 4
    assert summary["checkpoint"] == str(checkpoints[-1])


def test_second_identical_run_does_nothing(tiny: dict[str, Any], task_runs, run_logs) -> None:
    """Re-running a finished run: download is Cached, no train-epoch runs, no file changes;
    its log says "nothing to do", not "resumed after step ..." nor the lr warm-up."""
    first, summary = run(tiny)
    assert first.is_completed(), first.message
    before = files(Path(tiny["run.dir"]))
    second, again = run(tiny)
    assert second.is_completed(), second.message
    runs = task_runs(second.state_details.flow_run_id)
    assert [r.state.name for r in runs["download"]] == ["Cached"]
    assert "train-epoch" not in runs and "sample-and-log" not in runs
    assert files(Path(tiny["run.dir"])) == before
    assert again["epochs"] == 2 and again["run_dir"] == summary["run_dir"]
    assert again["checkpoint"] == summary["checkpoint"]  # the summary names the last one
    logs = run_logs(second.state_details.flow_run_id)
    assert [m for m in logs if "nothing to do" in m], logs
    assert not [m for m in logs if "resumed after" in m or "warm-up" in m], logs


def test_more_epochs_resume_and_other_hyperparameters_start_a_new_run(tiny: dict[str, Any]) -> None:
    """Raising train.epochs continues the same run folder from its checkpoint; changing lr
    starts a new folder; an explicit run.name reused with other settings is refused."""
    _, two = run(tiny)
    _, three = run({**tiny, "train.epochs": 3})
    assert three["run_dir"] == two["run_dir"] and three["global_step"] == 6
    _, other = run({**tiny, "optim.lr": 1e-3})
    assert other["run_dir"] != two["run_dir"] and other["global_step"] == 4
    run({**tiny, "run.name": "mine"})
    state, _ = run({**tiny, "run.name": "mine", "optim.lr": 1e-3})
    assert state.is_failed()
    assert "optim.lr: 0.0002 -> 0.001" in state.message and "pick another run.name" in state.message


def test_transient_failure_in_train_epoch_is_retried_from_the_checkpoint(
    tiny: dict[str, Any], task_runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure one step into epoch 2 is retried; the retry rewinds to epoch 1's checkpoint,
    so the global step has no gap or double count and the weights equal an uninterrupted run."""
    _, clean = run({**tiny, "run.dir": tiny["run.dir"] + "-clean"})
    real_on_step, failed = flows.train_tasks._EpochHooks.on_step, []

    def flaky(hooks, global_step: int, metrics) -> None:
        real_on_step(hooks, global_step, metrics)
        if global_step > 2 and not failed:  # epoch 2 is steps 3 and 4
            failed.append(global_step)
            raise RuntimeError("injected transient failure")

    monkeypatch.setattr(flows.train_tasks._EpochHooks, "on_step", flaky)
    state, summary = run(tiny)
    assert state.is_completed(), state.message
    assert failed == [3]  # one step of epoch 2 was taken, then it failed
    epochs = task_runs(state.state_details.flow_run_id)["train-epoch"]
    assert [r.run_count for r in epochs] == [1, 2]
    assert summary["global_step"] == clean["global_step"] == 4
    ours = load_checkpoint(summary["checkpoint"])
    theirs = load_checkpoint(clean["checkpoint"])
    assert ours["global_step"] == 4
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key


def test_bad_override_fails_the_flow_naming_it(tiny: dict[str, Any]) -> None:
    """An invalid override ends the flow run Failed with a message naming the setting."""
    state, _ = run({**tiny, "optim.lr": -1})
    assert state.is_failed()
    assert "optim.lr" in state.message and "greater than 0" in state.message
    state, _ = run({**tiny, "optim.lrr": 1})
    assert state.is_failed() and "optim.lrr" in state.message and "unknown setting" in state.message


def test_cuda_runs_take_turns_on_the_gpu_slot_and_cpu_runs_do_not_wait(tiny) -> None:
    """With the global concurrency limit `gpu` at 1 and its slot taken, a CUDA run's
    gpu_slot waits (here: times out after 1 s) while a CPU run's passes at once; without the
    limit a CUDA run does not wait. Tasks carry no tag: a run holds its slot for all its
    epochs, not per task (real server, no CUDA needed: the slot is a name)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    @flow
    def probe(device: str, timeout: float) -> str:
        with gpu_slot(device, timeout_seconds=timeout):
            return "in"

    assert not any(t.tags for t in (train_epoch_task, sample_and_log_task, checkpoint_task))
    assert probe("cuda", 1.0) == "in"  # no limit: nothing to wait for
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=GPU_SLOT, limit=1, active_slots=1)
        )
        try:
            assert probe("cpu", 1.0) == "in"
            state = probe("cuda", 1.0, return_state=True)
            assert state.is_failed()
            assert isinstance(state.result(raise_on_failure=False), TimeoutError)
        finally:
            client.delete_global_concurrency_limit_by_name(GPU_SLOT)


def test_offline_without_data_fails_after_retries_saying_where_to_put_it(
    tiny: dict[str, Any], task_runs, tmp_path: Path
) -> None:
    """No data and no network: download is tried 4 times, then the flow fails with a message
    saying where to put the archive or the extracted folder."""
    state, _ = run(
        {
            **tiny,
            "data.root": str(tmp_path / "empty"),
            "data.url": "http://127.0.0.1:9/cifar-10-python.tar.gz",
        }
    )
    assert state.is_failed()
    (download,) = task_runs(state.state_details.flow_run_id)["download"]
    assert download.run_count == 4
    assert "could not download" in state.message
    assert str(tmp_path / "empty" / "cifar-10-python.tar.gz") in state.message
    assert "cifar-10-batches-py/data_batch_1..5" in state.message


@pytest.mark.slow
def test_dataloader_workers_inside_a_flow_run(tiny: dict[str, Any], tmp_path: Path) -> None:
    """A DataLoader with num_workers=2 (forkserver) trains inside a flow run, where forked
    workers would die, and gives the same weights as the default device-resident batches."""
    _, resident = run({**tiny, "train.epochs": 1, "run.dir": str(tmp_path / "resident")})
    state, workers = run(
        {**tiny, "train.epochs": 1, "data.loader": "dataloader", "data.num_workers": 2}
    )
    assert state.is_completed(), state.message
    a, b = load_checkpoint(resident["checkpoint"]), load_checkpoint(workers["checkpoint"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_command_line_runs_with_env_settings(tiny: dict[str, Any], tmp_path: Path, cli_env) -> None:
    """`python flows/train_flow.py` with DDPM_* env settings and a flag completes on Prefect's
    temporary local server (no PREFECT_API_URL) and writes checkpoints and grids."""
    result = subprocess.run(
        [sys.executable, str(REPO / "flows" / "train_flow.py"), "--train.epochs", "1"],
        env=cli_env(tiny, harness=False),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = Path(tiny["run.dir"]).iterdir()
    assert (run_dir / "checkpoints" / "epoch_001.pt").is_file()
    assert (run_dir / "samples" / "epoch_001.png").is_file()
    assert "Finished in state Completed" in result.stdout + result.stderr


def test_command_line_help_and_bad_settings(tmp_path: Path, cli_env) -> None:
    """--help lists every setting with its env name and default; a bad env value exits 2 with
    a short message naming the variable, no traceback."""
    script = str(REPO / "flows" / "train_flow.py")
    shown = subprocess.run(
        [sys.executable, script, "--help"],
        env=cli_env({}, harness=False),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0
    for text in (
        "--optim.lr",
        "DDPM_OPTIM__LR",
        "--train.epochs",
        "DDPM_TRAIN__EPOCHS",
        "(default: 100)",
    ):
        assert text in shown.stdout
    bad = subprocess.run(
        [sys.executable, script],
        env=cli_env({"optim.lr": "-1"}, harness=False),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "DDPM_OPTIM__LR" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_interactive_terminal_gets_a_progress_bar(
    tiny: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """With stderr on a terminal, each epoch and each sample grid draws a progress bar that
    reaches all its steps."""
    import pty

    env = cli_env(tiny)  # the harness's server: no startup wait
    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def read() -> None:  # drain the terminal while the run writes, so it never blocks
        with contextlib.suppress(OSError):
            while chunk := os.read(leader, 65536):
                chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    result = subprocess.run(
        [sys.executable, str(REPO / "flows" / "train_flow.py")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=follower,
        timeout=300,
    )
    os.close(follower)
    reader.join(timeout=10)
    os.close(leader)
    screen = b"".join(chunks)
    assert result.returncode == 0
    text = screen.decode(errors="replace")
    for label, steps in (("epoch 1/2", 2), ("epoch 2/2", 2), ("samples after epoch 2", 5)):
        assert re.search(rf"{label} .*{steps}/{steps}", text), (label, text[-2000:])


@pytest.mark.slow(seconds=30)
def test_an_image_folder_is_prepared_on_first_use_and_trains_as_it_would_unprepared(
    tiny: dict[str, Any], tmp_path: Path, task_runs
) -> None:
    """data.prepare=auto (the default) on data.dataset=folder: the flow's prepare-folder task
    prepares the folder under data.root/prepared/ and the run trains on it to the weights
    data.prepare=off gives (same run name: the same images); a second run reuses the prepared
    copy, writing nothing to it."""
    from PIL import Image

    from ddpm.prepared import MANIFEST

    rng = torch.Generator().manual_seed(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):
        pixels = torch.randint(0, 256, (36, 44, 3), generator=rng, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(images / f"{i:02d}.png")
    base = {**tiny, "data.dataset": "folder", "data.folder": str(images), "data.subset": 0,
            "train.epochs": 1}  # fmt: skip
    off_state, off = run({**base, "data.prepare": "off", "run.dir": str(tmp_path / "off")})
    assert off_state.is_completed(), off_state.message
    state, auto = run(base)
    assert state.is_completed(), state.message
    assert "prepare-folder" not in task_runs(off_state.state_details.flow_run_id)
    assert [r.state.name for r in task_runs(state.state_details.flow_run_id)["prepare-folder"]] \
        == ["Completed"]  # fmt: skip
    (prepared,) = (Path(tiny["data.root"]) / "prepared").iterdir()
    assert json.loads((prepared / MANIFEST).read_text())["count"] == 40
    assert Path(off["run_dir"]).name == Path(auto["run_dir"]).name
    a, b = load_checkpoint(off["checkpoint"]), load_checkpoint(auto["checkpoint"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    stamp = files(prepared)
    again, _ = run({**base, "run.dir": str(tmp_path / "again")})
    assert again.is_completed(), again.message
    assert files(prepared) == stamp


@pytest.mark.slow(seconds=20)
def test_a_prepared_dataset_at_a_url_trains(tiny: dict[str, Any], tmp_path: Path) -> None:
    """--data.folder file:///... (a URL, read through pyarrow.fs as s3:// and gs:// are): the
    download task copies the dataset under data.root/remote/ and the run trains on it."""
    from ddpm.prepare import prepare
    from ddpm.sources import find_source

    store = tmp_path / "bucket" / "cifar"
    prepare(find_source(tiny["data.root"]), store, 32, workers=1)
    url = store.as_uri()
    state, summary = run({**tiny, "data.dataset": "prepared", "data.folder": url,
                          "train.epochs": 1})  # fmt: skip
    assert state.is_completed(), state.message
    (local,) = (Path(tiny["data.root"]) / "remote").iterdir()
    assert json.loads((local / "remote.json").read_text()) == {"url": url}
    assert load_checkpoint(summary["checkpoint"])["settings"]["data"]["folder"] == url
