"""One Prefect test harness for the whole session (it takes ~10 s to start), with results and
caches kept in a temporary folder, and a tiny-run configuration shared by the flow tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness
from tiny_run import tiny_overrides

from settings import env_name


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    storage = tmp_path_factory.mktemp("prefect-storage")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness():
        yield


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Any]:
    """The tiny run's overrides (tiny_overrides), its data in tmp_path."""
    return tiny_overrides(tmp_path)


@pytest.fixture
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, str]]:
    """cli_env(overrides, harness=True) -> the environment of a `python flows/train_flow.py`
    child: settings as DDPM_* variables and, with harness, the test harness's Prefect server
    (else none: the child starts Prefect's temporary server, as a new user's run does, on a
    PREFECT_HOME of the test's own, so no two tests' servers share one SQLite database)."""

    def make(overrides: dict[str, Any], harness: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DDPM_", "PREFECT_"))}
        env.update({env_name(k): str(v) for k, v in overrides.items()})
        env.update(PYTHONUNBUFFERED="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
        if harness:
            env["PREFECT_API_URL"] = PREFECT_API_URL.value()
        else:
            env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
        return env

    return make


@pytest.fixture
def task_runs():
    """task_runs(flow_run_id) -> the flow run's task runs by task name, oldest first."""

    def read(flow_run_id: Any) -> dict[str, list[Any]]:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        by_name: dict[str, list[Any]] = {}
        for run in sorted(runs, key=lambda r: r.expected_start_time):
            by_name.setdefault(run.name.rsplit("-", 1)[0], []).append(run)  # "train-epoch-3f1"
        return by_name

    return read


@pytest.fixture
def run_logs():
    """run_logs(flow_run_id) -> the messages the flow run logged, read back through the API
    (after sending what is still queued), oldest first."""

    def read(flow_run_id: Any) -> list[str]:
        APILogHandler().flush()  # sends what every handler queued (one shared worker)
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
        return [log.message for log in sorted(logs, key=lambda log: log.timestamp)]

    return read


@pytest.fixture
def wandb_records():
    """wandb_records(run_dir) -> the protobuf Records of the offline .wandb files under run_dir,
    read with wandb's own protobuf: the file is a LevelDB-style log of 32 KiB blocks after a
    7-byte header, each record a 7-byte header (crc32, length, type full/first/middle/last).
    wandb 0.31 ships no reader of its own for these files (its `sdk.internal.datastore` went in
    0.31, and `wandb.Api` reads only synced runs), so the framing is read here."""
    import struct

    from wandb.proto import wandb_internal_pb2

    block = 32 * 1024

    def chunks(data: bytes) -> Iterator[bytes]:
        assert data[:4] == b":W&B", "not a W&B transaction log"
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:  # block trailer padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind == 1:
                yield body
            elif kind == 2:
                pending = body
            elif kind == 3:
                pending += body
            elif kind == 4:
                yield pending + body
                pending = b""

    def read(run_dir: Path) -> list[Any]:
        records = []
        for path in sorted(Path(run_dir).rglob("run-*.wandb")):
            for raw in chunks(path.read_bytes()):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(raw)
                records.append(record)
        return records

    return read
