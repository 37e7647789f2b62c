"""Tracking: what an offline W&B run really wrote (read from its .wandb file with wandb's own
protobuf), the Prefect artifacts on the server, and that the W&B key is written nowhere."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from run_records import flow_artifacts, history

from flows.train_flow import train_flow
from settings import flatten, load_settings

FAKE_KEY = "fakekey" + "0123456789" * 3 + "abc"


@pytest.fixture
def offline(tiny: dict[str, Any]) -> dict[str, Any]:
    return {**tiny, "wandb.mode": "offline"}


def test_offline_wandb_run_logs_everything_but_code(offline, wandb_records) -> None:
    """One history row per step (loss, running mean, lr, grad norm), a grid per epoch, the
    input batch, a config of every setting, the settings file as a `config` artifact; no code."""
    state = train_flow(overrides=offline, return_state=True)
    assert state.is_completed(), state.message
    run_dir = Path(state.result()["run_dir"])
    records = wandb_records(run_dir / "wandb")
    rows = history(records)

    steps = [r for r in rows if "train/loss" in r]
    assert [r["global_step"] for r in steps] == [1, 2, 3, 4]
    assert all({"train/loss_avg", "train/lr", "train/grad_norm"} <= set(r) for r in steps)
    assert steps[1]["train/loss_avg"] == pytest.approx(
        (steps[0]["train/loss"] + steps[1]["train/loss"]) / 2
    )
    epochs = [r for r in rows if "epoch/loss" in r]
    assert [(r["epoch"], r["global_step"]) for r in epochs] == [(1, 2), (2, 4)]
    assert all(r["samples/_type"] == "image-file" for r in epochs)
    assert all({"epoch/images_per_s", "epoch/seconds"} <= set(r) for r in epochs)
    (inputs,) = [r for r in rows if "inputs/_type" in r]
    assert inputs["inputs/_type"] == "image-file" and inputs["global_step"] == 0

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update if i.key != "_wandb"}
    expected = load_settings(offline, env_file=None).model_dump(mode="json")
    assert flatten(config) == flatten(expected)

    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, [e.path for e in a.manifest.contents]) for a in artifacts] == [
        ("config", ["settings.json"])
    ]
    files = [
        f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files
    ]
    assert len([f for f in files if f.startswith("media/images/samples")]) == 2
    assert not any("code" in f for f in files)
    assert not list((run_dir / "wandb").rglob("*.py"))


def test_prefect_artifacts_show_progress_metrics_and_summary(offline) -> None:
    """The flow run has a progress artifact at 100 %, a table with one row per epoch, a
    markdown summary naming the run folder and an image artifact per sample grid that carries
    the grid's PNG; keys are stable lowercase-dash names."""
    state = train_flow(overrides=offline, return_state=True)
    artifacts = flow_artifacts(state.state_details.flow_run_id)
    assert set(artifacts) == {"training-progress", "epoch-metrics", "run-summary", "samples"}
    (progress,) = artifacts["training-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    table = json.loads(artifacts["epoch-metrics"][-1].data)
    assert [row["epoch"] for row in table] == [1, 2]
    assert [row["global_step"] for row in table] == [2, 4]
    assert len(artifacts["epoch-metrics"]) == 2  # one version per epoch: history in the UI
    summary = artifacts["run-summary"][-1].data
    assert state.result()["run_dir"] in summary and "epoch_002.pt" in summary
    samples = artifacts["samples"]
    grids = sorted(Path(state.result()["run_dir"], "samples").glob("epoch_*.png"))
    assert [a.type for a in samples] == ["image", "image"]
    assert [a.data for a in samples] == [
        "data:image/png;base64," + base64.b64encode(grid.read_bytes()).decode() for grid in grids
    ]
    assert "epoch 2" in samples[-1].description


def test_the_metrics_table_keeps_every_epoch_across_resumes(tiny: dict[str, Any]) -> None:
    """A run resumed for a second epoch publishes both epochs' rows (kept in the run folder's
    metrics.jsonl); run again once finished, it publishes the same table and trains nothing;
    a row written past the newest checkpoint (a run killed before it) is dropped on resume."""
    first = train_flow(overrides={**tiny, "train.epochs": 1}, return_state=True)
    run_dir = Path(first.result()["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    with open(run_dir / "metrics.jsonl", "a") as f:  # epoch 2 trained, killed before its save
        f.write(json.dumps({**rows[0], "epoch": 2, "loss": -1.0}) + "\n")
    second = train_flow(overrides=tiny, return_state=True)
    table = json.loads(flow_artifacts(second.state_details.flow_run_id)["epoch-metrics"][-1].data)
    assert [row["epoch"] for row in table] == [1, 2] and table[0] == rows[0]
    assert table[1]["loss"] > 0  # trained again, not the row of the killed run
    done = train_flow(overrides=tiny, return_state=True)
    artifacts = flow_artifacts(done.state_details.flow_run_id)
    assert json.loads(artifacts["epoch-metrics"][-1].data) == table
    assert "training-progress" not in artifacts  # nothing trained


def test_resumed_training_continues_the_same_wandb_run(offline, wandb_records) -> None:
    """A second flow run that trains more epochs logs to the same W&B run id."""
    first = train_flow(overrides={**offline, "train.epochs": 1}, return_state=True).result()
    second = train_flow(overrides=offline, return_state=True).result()
    assert first["run_dir"] == second["run_dir"]
    run_dir = Path(second["run_dir"])
    ids = {
        r.run.run_id
        for r in wandb_records(run_dir / "wandb")
        if r.WhichOneof("record_type") == "run"
    }
    assert ids == {(run_dir / "wandb_id.txt").read_text().strip()}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2


def test_api_key_is_written_nowhere(offline, monkeypatch, tmp_path: Path) -> None:
    """With WANDB_API_KEY set, the key is in no file under the run folder or WANDB_DIR and in
    no Prefect log or parameter of the flow run."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    state = train_flow(overrides=offline, return_state=True)
    assert state.is_completed(), state.message
    written = [
        p
        for folder in (Path(offline["run.dir"]), tmp_path / "wandb-dir")
        for p in folder.rglob("*")
        if p.is_file()
    ]
    assert any(p.suffix == ".wandb" for p in written)
    assert not [p for p in written if FAKE_KEY.encode() in p.read_bytes()]
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        logs = client.read_logs(
            log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert logs and not [log for log in logs if FAKE_KEY in log.message]
    assert FAKE_KEY not in json.dumps(flow_run.parameters)


def test_disabled_mode_writes_no_wandb_files(tiny: dict[str, Any]) -> None:
    """wandb.mode=disabled trains with no W&B files or id at all."""
    state = train_flow(overrides={**tiny, "wandb.mode": "disabled"}, return_state=True)
    run_dir = Path(state.result()["run_dir"])
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_id.txt").exists()
    assert not list(Path(tiny["run.dir"]).rglob("*.wandb"))


def test_a_damaged_wandb_id_is_recovered_from_the_newest_wandb_run_folder(
    tmp_path: Path, caplog
) -> None:
    """The run's W&B id is made once and kept; torn or overwritten, it is read back from the
    newest W&B run folder (`offline-run-<time>-<id>`), so the resumed run continues its W&B
    run; with no such folder a new id is made. Either way one warning names the file."""
    import logging

    from flows.tracking import wandb_run_id

    id_file = tmp_path / "wandb_id.txt"
    first = wandb_run_id(id_file)
    assert wandb_run_id(id_file) == first and len(first) == 16
    (tmp_path / "wandb" / f"offline-run-20261201_101010-{first}").mkdir(parents=True)
    id_file.write_bytes(b"\x00\xff" + first.encode()[:5])
    with caplog.at_level(logging.WARNING):
        assert wandb_run_id(id_file) == first
    assert f"{id_file} is damaged" in caplog.text and "newest W&B run folder" in caplog.text
    assert id_file.read_text() == first + "\n"
    id_file.write_text("")
    (tmp_path / "wandb" / f"offline-run-20261201_101010-{first}").rmdir()
    other = wandb_run_id(id_file)
    assert other != first and id_file.read_text() == other + "\n" and "a new id" in caplog.text
