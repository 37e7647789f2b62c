"""`python flows/train_flow.py` and `python flows/sample_flow.py`: the command lines around
train_flow and sample_flow.

Flags and settings are read and checked before torch and Prefect are imported, so `--help`
and a bad setting answer at once. Without PREFECT_API_URL the run starts its own temporary
Prefect server (flows.server). SIGTERM and SIGINT stop the run cleanly (flows.shutdown).

Exit status: 0 done; 2 a failure the user fixes (settings, data, checkpoint, run folder in
use, server start), told in one line, with the traceback only under run.debug; 1 anything
else (the traceback, then one line); 128 + N stopped by signal N; 75 the Prefect API went
away (the run is saved; re-run once it is back).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm.errors import UserError
from ddpm.files import claim_folder
from ddpm.marked_folders import check_export_target
from flows.commands import (
    PROG,
    ema_parser,
    export_parser,
    parse_command,
    parse_sample_args,
    prepare_parser,
    sweep_parser,
)
from flows.launch import launched_overrides, rank_main, write_outcome
from flows.shutdown import StopRequest
from settings import Settings, SettingsError, load_settings, parse_flags
from settings.loading import one_line
from settings.sampling import OptionsError

if TYPE_CHECKING:
    from prefect.states import State


def main(argv: list[str] | None = None) -> int:
    """`python flows/train_flow.py`: parse flags, validate settings, run train_flow; returns
    the exit status above."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides = {**launched_overrides(), **parse_flags(argv, prog=PROG)}
        cfg = load_settings(overrides)
    except SettingsError as err:
        print(f"error: {message(err)}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) > 0:  # a launcher's rank: rank 0 runs the flow
        return rank_main(cfg)

    def load() -> Callable[[], State]:
        from flows.train_flow import train_flow  # torch, prefect, wandb: seconds

        return lambda: train_flow(overrides=overrides or None, return_state=True)

    return run_flow(cfg, load)


def sample_main(argv: list[str] | None = None) -> int:
    """`python flows/sample_flow.py`: parse options and settings flags, run sample_flow;
    returns the exit status above."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        options, overrides = parse_sample_args(argv)
        cfg = load_settings(overrides)
    except UserError as err:
        print(f"error: {message(err)}", file=sys.stderr)
        return 2

    def load() -> Callable[[], State]:
        from flows.sample_flow import sample_flow  # torch, prefect: seconds

        return lambda: sample_flow(options, overrides=overrides or None, return_state=True)

    return run_flow(cfg, load)


def export_main(argv: list[str] | None = None) -> int:
    """`python flows/export_flow.py --run PATH --out DIR [--no-ema]`: run export_flow;
    returns the exit status above."""
    args = parse_command(export_parser(), sys.argv[1:] if argv is None else argv)
    try:
        # argparse gives `--run=--` a list
        run, out = (v if isinstance(v, str) else "" for v in (args.run, args.out))
        if not run or not Path(run).exists():
            raise UserError(one_line(f"--run {run}: no such run folder or checkpoint"))
        if not out:
            raise UserError("--out: a folder to write is needed")
        check_export_target(Path(out))  # a folder of the user's: refused, untouched
        cfg = load_settings({})
    except UserError as err:
        print(f"error: {message(err)}", file=sys.stderr)
        return 2

    def load() -> Callable[[], State]:
        from flows.export_flow import export_flow  # torch, prefect: seconds

        return lambda: export_flow(run, out, args.use_ema, return_state=True)

    return run_flow(cfg, load)


def ema_main(argv: list[str] | None = None) -> int:
    """`ddpm-ema --run RUN --sigma-rel 0.05,0.10`: run ema_flow; returns the exit status
    above."""
    args = parse_command(ema_parser(), sys.argv[1:] if argv is None else argv)
    try:
        run = args.run if isinstance(args.run, str) else ""
        if not run or not Path(run).is_dir():
            raise UserError(one_line(f"--run {run}: no such run folder"))
        try:
            sigma_rels = [float(s) for s in str(args.sigma_rel).split(",") if s.strip()]
        except ValueError:
            message_ = f"--sigma-rel {args.sigma_rel}: numbers, comma-separated"
            raise UserError(one_line(message_)) from None
        # ddpm.phema's range (not imported here: torch): below the uniform average's sqrt(1/12)
        if not sigma_rels or any(not 0 < s < math.sqrt(1 / 12) for s in sigma_rels):
            raise UserError(one_line(f"--sigma-rel {args.sigma_rel}: each in (0, 0.288)"))
        cfg = load_settings({})
    except UserError as err:
        print(f"error: {message(err)}", file=sys.stderr)
        return 2

    def load() -> Callable[[], State]:
        from flows.ema_flow import ema_flow  # torch, prefect: seconds

        return lambda: ema_flow(run, sigma_rels, return_state=True)

    return run_flow(cfg, load)


def prepare_main(argv: list[str] | None = None) -> int:
    """`ddpm-prepare --source SOURCE --out OUT --image-size N` (= python flows/prepare_flow.py):
    run prepare_flow; returns the exit status above."""
    args = parse_command(prepare_parser(), sys.argv[1:] if argv is None else argv)
    try:
        source, out = Path(str(args.source)), Path(str(args.out))
        if not source.is_dir():
            what = "a file; give the folder that holds the images" if source.exists() else (
                "no such folder")  # fmt: skip
            raise UserError(one_line(f"--source {source}: {what}"))
        size = _whole(args.image_size, "--image-size")
        if not 32 <= size <= 1024 or size % 32:
            raise UserError(f"--image-size {size}: a multiple of 32 from 32 to 1024 (the U-Net "
                            "halves it five times)")  # fmt: skip
        workers = None if args.workers is None else _whole(args.workers, "--workers")
        if workers is not None and workers < 1:
            raise UserError(f"--workers {workers}: at least 1")
        shard_size = _whole(args.shard_size, "--shard-size")
        if shard_size < 1:
            raise UserError(f"--shard-size {shard_size}: at least 1")
        claim_folder(out, "preparing.json", "a prepared dataset", ("lock",), "--out")
        cfg = load_settings({})
    except UserError as err:
        print(f"error: {message(err)}", file=sys.stderr)
        return 2

    def load() -> Callable[[], State]:
        from flows.prepare_flow import prepare_flow  # torch, prefect: seconds

        return lambda: prepare_flow(str(source), str(out), size, int(args.channels),
                                    args.column, workers, shard_size,
                                    return_state=True)  # fmt: skip

    return run_flow(cfg, load)


def _whole(value: Any, flag_: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise UserError(one_line(f"{flag_} {value}: a whole number")) from None


# A stopped sweep waits for its trials to save (their run.stop_timeout) and for the workers to
# see the cancellation (Prefect's workers look every few seconds).
SWEEP_STOP_GRACE = 60.0


def sweep_main(argv: list[str] | None = None) -> int:
    """`ddpm-sweep --spec sweep.yaml` (= python flows/sweep_flow.py): run sweep_flow; returns
    the exit status above. Without PREFECT_API_URL it starts a temporary server and serves the
    spec's deployment from this machine (flows.sweep_flow.local_runner)."""
    args = parse_command(sweep_parser(), sys.argv[1:] if argv is None else argv)
    from flows.sweep.record import claim
    from settings.sweep import read_spec

    try:
        spec = read_spec(args.spec)
        base = load_settings(spec.settings_base)
        cfg = load_settings({**spec.settings_base, "run.stop_timeout": base.run.stop_timeout
                             + SWEEP_STOP_GRACE})  # fmt: skip
        claim(spec)  # the sweep's folder: a user's is refused, untouched
    except UserError as err:
        print(f"error: {message(err)}", file=sys.stderr)
        return 2
    from prefect.settings import PREFECT_API_URL

    served = not PREFECT_API_URL.value()  # no server: serve the trials' deployment here

    def load() -> Callable[[], State]:
        from flows.sweep.record import sweep_folder
        from flows.sweep_flow import local_runner, sweep_flow  # prefect: seconds

        def call() -> State:
            runner = contextlib.nullcontext()
            if served:
                log = sweep_folder(spec) / "trials.log"
                runner = local_runner(
                    spec.deployment, spec.concurrency, cfg.run.server_timeout, log
                )
            with runner:
                return sweep_flow(args.spec, adopt=not served, return_state=True)

        return call

    return run_flow(cfg, load)


def run_flow(cfg: Settings, load: Callable[[], Callable[[], State]]) -> int:
    """Run a flow from the command line: stop requests on SIGTERM/SIGINT, the Prefect API (or
    a temporary server), quiet expected errors; returns the exit status above.

    Args:
        load: imports the flow (which sets up Prefect's log handlers, so it comes before the
            handlers are made quiet) and returns the call that runs it, returning its state.
    """
    stop = StopRequest(cfg.run.stop_timeout)
    # Logging's own errors are not printed (the stdlib's setting for production): Prefect's log
    # worker writes "--- Error logging to API ---" whenever a batch fails, so a lost server
    # printed it before the watchdog's one line said what happened (flows.shutdown).
    logging.raiseExceptions = False
    with stop.signals_handled():
        try:
            with _prefect_api(cfg):
                call = load()
                with _expected_errors_quiet(not cfg.run.debug):
                    state = call()
        except UserError as err:
            return _end(2, f"error: {message(err)}")
        except BaseException as err:
            if type(err).__name__ != "TerminationSignal":  # prefect.exceptions'
                raise
            # A signal while the flow run was ending, after the run's own handler was gone
            # (the launcher stopping rank 0 of a group that lost a rank): Prefect's handler
            # raises it; the run has ended already, so one line says so. Not final: under the
            # launcher the group is started again.
            code = 128 + getattr(err, "signal", signal.SIGTERM)
            return _end(code, f"stopped: {signal.Signals(code - 128).name} received as the "
                        "run was ending; re-run to resume", final=False)  # fmt: skip
    if stop():
        return _end(stop.exit_code, f"stopped: {state.message}")
    if state.is_completed():
        return _end(0, None, state.result())
    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):
        return _end(1, f"error: the run ended {state.name}: {state.message}")
    from ddpm.trainer import TrainingDiverged

    code = getattr(error, "exit_code", 2 if isinstance(error, UserError) else 1)
    final = isinstance(error, (UserError, TrainingDiverged))  # no restart changes these
    return _end(code, f"error: {message(error)}", final=final)


def message(err: BaseException) -> str:
    """An error's message for the command's last line: one line (its line breaks written as
    \\n), but for settings and options errors, which give one line per bad value."""
    if isinstance(err, (SettingsError, OptionsError)):
        return str(err)
    return one_line(str(err))


def _end(code: int, line: str | None, summary: Any = None, final: bool = True) -> int:
    """Print the command's last line and return its exit status; as rank 0 of flows.launch,
    record an outcome no restart changes for the launcher to print, and exit 0 so that it
    does not restart the group."""
    if final and write_outcome(code, line and line.partition(": ")[2], summary):
        return 0
    if line:
        print(line, file=sys.stderr)
    return code


@contextlib.contextmanager
def _prefect_api(cfg: Settings) -> Iterator[None]:
    """Use PREFECT_API_URL when set; otherwise a temporary server of the run's own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        try:
            yield
        finally:
            _send_pending_logs_and_events()  # before the last line, not after it at exit
        return
    from flows.server import temporary_server

    with temporary_server(cfg.run.server_timeout) as url:
        print(
            f"temporary Prefect server at {url} (set PREFECT_API_URL to use your own)",
            file=sys.stderr,
            flush=True,
        )
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                yield
            finally:
                _send_pending_logs_and_events()  # while the server is still up


def _send_pending_logs_and_events(timeout: float = 5.0) -> None:
    """Let Prefect's log and event workers send what they hold while the server is still up
    (they would otherwise retry against the stopped server at exit, for minutes)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


class _DropTracebacksOf(logging.Filter):
    """Drops the log lines that carry a traceback of one of `expected`: the command line ends
    with their message in one line."""

    def __init__(self, expected: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], self.expected))


@contextlib.contextmanager
def _expected_errors_quiet(quiet: bool) -> Iterator[None]:
    """While inside, the console handlers drop the tracebacks of errors the user fixes, of a
    diverged run and of a lost rank (when quiet)."""
    from ddpm.distributed import RankFailed
    from ddpm.trainer import TrainingDiverged
    from flows.launch import LaunchError

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    dropper = _DropTracebacksOf((UserError, TrainingDiverged, RankFailed, LaunchError))
    if quiet:
        for handler in handlers:
            handler.addFilter(dropper)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(dropper)
