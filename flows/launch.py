"""`train.devices N` on one machine: N ranks started, watched and restarted by torch's elastic
launcher (`torch.distributed.launcher.elastic_launch`, what torchrun runs).

Each rank runs the training command, `python -m flows.train_flow`, as torchrun would run
it, with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set by the launcher and the settings
from this process (its overrides travel as JSON in TRAIN_FLOW_OVERRIDES): rank 0 runs
train_flow (its own Prefect flow run, the run folder, W&B), the other ranks `rank_main`.
When a rank dies, the launcher stops the others and starts the group again, up to
train.max_restarts times; rank 0 resumes from the newest checkpoint, in the same run folder
and W&B run. Once the restarts are spent, the run fails naming the rank that died first.

A run that ends in a way no restart can change (finished, stopped, diverged, a setting or
file to fix) must not be restarted: rank 0 writes its outcome to the file named in
TRAIN_FLOW_OUTCOME and every rank exits with status 0, which the launcher takes as the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flows.children import free_port

OVERRIDES = "TRAIN_FLOW_OVERRIDES"  # the launcher's overrides, as JSON, for every rank
OUTCOME = "TRAIN_FLOW_OUTCOME"  # where rank 0 writes how the run ended


class LaunchError(RuntimeError):
    """The group failed after its restarts, or rank 0 ended the run with an error."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def launch(
    devices: int, max_restarts: int, stop_timeout: float, overrides: dict[str, Any], api: str
) -> dict[str, Any]:
    """Run the training command on `devices` ranks under the elastic launcher and return rank
    0's outcome: {"exit_code", "message", "summary"}.

    Args:
        max_restarts: group restarts after a failed rank (train.max_restarts).
        stop_timeout: seconds a rank may take to stop after the launcher's SIGTERM before
            it is killed (run.stop_timeout).
        overrides: the settings overrides every rank applies over env and `.env`.
        api: the Prefect API rank 0 reports to.

    Raises:
        LaunchError: naming the rank that failed, once the restarts are spent.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="ddpm-launch-") as folder:
        outcome = Path(folder) / "outcome.json"
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=devices, run_id=uuid.uuid4().hex,
            rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
            local_addr="127.0.0.1", max_restarts=max_restarts, monitor_interval=0.2,
            shutdown_timeout=int(stop_timeout) + 10, logs_specs=DefaultLogsSpecs(folder),
        )  # fmt: skip
        env = {OVERRIDES: json.dumps(overrides, default=str), OUTCOME: str(outcome)}
        with _environment({**env, "PREFECT_API_URL": api}), _signal_handlers_kept():
            try:
                elastic_launch(config, sys.executable)("-m", "flows.train_flow")
            except SignalException as err:  # the ranks were told and have stopped
                return _read(outcome) or {"exit_code": 128 + err.sigval, "message": str(err)}
            except ChildFailedError as err:
                raise LaunchError(_failure(err, max_restarts)) from None
        return _read(outcome) or {"exit_code": 1, "message": "rank 0 left no outcome"}


def _read(path: Path) -> dict[str, Any] | None:
    """Rank 0's outcome; None when it left none (or none whole: it is written atomically, so
    only a kill between its bytes and its rename could leave a part, which is never read)."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) and "exit_code" in record else None


def _failure(err: Any, max_restarts: int) -> str:
    """'rank 1 (pid P) was killed by SIGKILL; ...' for the rank that failed first (a killed
    rank before the ones that failed for losing it)."""
    failures = err.failures
    rank = min(failures, key=lambda r: (failures[r].exitcode >= 0, failures[r].timestamp))
    failure = failures[rank]
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    else:
        how = f"exited with status {failure.exitcode}"
    spent = f"the group was restarted {max_restarts} times" if max_restarts else "no restarts"
    return (
        f"rank {rank} (pid {failure.pid}) {how}; {spent} (train.max_restarts = {max_restarts}), "
        "so the run ends here; re-run the same command to resume from its newest checkpoint"
    )


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with values set while inside (the launcher's ranks inherit it)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Put back this process's SIGTERM/SIGINT handlers after the launcher replaced them."""
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    saved = {getattr(signal, n): signal.getsignal(getattr(signal, n)) for n in names}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def write_outcome(exit_code: int, message: str | None, summary: Any = None) -> bool:
    """(rank 0 under `launch`) Record how the run ended; False when not under `launch`."""
    path = os.environ.get(OUTCOME)
    if path is None:
        return False
    from ddpm.files import write_text

    record = {"exit_code": exit_code, "message": message, "summary": summary}
    write_text(Path(path), json.dumps(record, default=str))
    return True


def launched_overrides() -> dict[str, Any]:
    """The overrides the launcher passed to its ranks (none outside `launch`)."""
    return json.loads(os.environ.get(OVERRIDES, "{}"))


def rank_main(settings: Any) -> int:
    """A rank other than 0: join the group, train with it (ddpm.group_training.train_rank), leave.

    SIGINT and SIGTERM are rank 0's to act on: it stops every rank after the same step.
    Exit status: 0 when the run ended (done, stopped, diverged, or rank 0 recorded an end no
    restart changes); 1 when the group broke, for the launcher to restart it.
    """
    from ddpm.distributed import RankFailed, join
    from ddpm.errors import first_line
    from ddpm.group_training import train_rank
    from ddpm.trainer import TrainingDiverged
    from settings import core_config

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    config = core_config(settings)
    group = None
    try:
        group = join(config.train.device, config.train.rank_timeout)
        print(f"rank {group.rank} (pid {os.getpid()}) joined {group.world_size} ranks",
              file=sys.stderr, flush=True)  # fmt: skip
        train_rank(group, config)
    except TrainingDiverged:
        return 0  # rank 0 diverged at the same step, and reports it
    except RankFailed as err:
        if os.environ.get(OUTCOME) and Path(os.environ[OUTCOME]).is_file():
            return 0  # rank 0 ended the run and left
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 1
    finally:
        if group is not None:
            group.leave()
    return 0
