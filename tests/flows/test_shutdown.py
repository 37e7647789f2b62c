"""Stopping cleanly and speaking clearly, with real processes and real signals: SIGTERM and
SIGINT to the process group mid-epoch, a second Ctrl-C, the Prefect server killed mid-run, a
second launch on a running run, the offline error, the temporary server, and --help."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_run import REPO, Cli, signal_group

from ddpm.checkpoint import load_checkpoint
from ddpm.run_dir import RunDir, load_newest_valid
from flows.server import temporary_server
from flows.shutdown import EXIT_API_LOST, api_answers


@pytest.fixture
def long_run(tiny: dict[str, Any], tmp_path: Path, cifar_writer) -> dict[str, Any]:
    """A 2-epoch run of 20 steps per epoch (160 images at batch 8), deterministic, no grids."""
    cifar_writer(tmp_path / "data", images_per_batch=32)
    return {
        **tiny,
        "data.subset": 0,
        "train.batch_size": 8,
        "train.epochs": 2,
        "sample.every": 0,
        "train.deterministic": True,
    }


@pytest.mark.slow(seconds=65)
def test_sigterm_and_sigint_stop_within_seconds_and_the_resumed_run_is_bitwise_the_same(
    long_run: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """SIGTERM, then SIGINT, to the whole process group mid-epoch, with the run's own
    temporary Prefect server (which the group signal used to kill): each exits with 128 + N
    well within run.stop_timeout, saves the step it logged last (no step lost), and says
    how to resume in its last line. A third launch gets two Ctrl-Cs and exits at once. The
    finished run's weights and EMA equal an uninterrupted run's bit for bit."""
    straight = Cli(cli_env({**long_run, "run.dir": str(tmp_path / "straight")}), tmp_path)
    assert straight.finish() == 0, straight.output[-3000:]

    env = cli_env(long_run, harness=False)
    run = None
    for signum, at in ((signal.SIGTERM, 5), (signal.SIGINT, 13)):
        cli = Cli(env, tmp_path)
        cli.wait_for_step(at)
        sent = signal_group(cli, signum)
        code = cli.finish()
        seconds = time.monotonic() - sent
        assert code == 128 + signum, cli.output[-3000:]
        assert seconds < long_run.get("run.stop_timeout", 30), seconds
        (run_dir,) = Path(long_run["run.dir"]).iterdir()
        run = RunDir(run_dir)
        saved = load_newest_valid(run)[1]["global_step"]
        assert saved == cli.last_step, (saved, cli.last_step)  # the last step logged is kept
        assert "Traceback" not in cli.output
        last = cli.output.strip().splitlines()[-1]
        assert last.startswith(f"stopped: {signal.Signals(signum).name} received"), last
        assert "re-run to resume" in last
        print(f"{signal.Signals(signum).name}: exit {code} {seconds:.1f} s after the signal")

    cli = Cli(env, tmp_path)
    cli.wait_for_step(27)
    sent = signal_group(cli, signal.SIGINT)
    time.sleep(0.2)
    signal_group(cli, signal.SIGINT)
    assert cli.finish() == 128 + signal.SIGINT, cli.output[-3000:]
    print(f"two SIGINTs: exit {time.monotonic() - sent:.1f} s after the first")

    assert Cli(env, tmp_path).finish() == 0
    ours = load_checkpoint(run.epoch_checkpoints()[-1])
    (straight_dir,) = (tmp_path / "straight").iterdir()
    theirs = load_checkpoint(RunDir(straight_dir).epoch_checkpoints()[-1])
    assert ours["global_step"] == theirs["global_step"] == 40
    for part in ("model", "ema"):
        for key, value in theirs[part].items():
            assert torch.equal(ours[part][key], value), (part, key)


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


@pytest.mark.slow
def test_server_killed_mid_run_saves_the_step_and_exits_75_in_one_line(
    long_run: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """The run's Prefect server SIGKILLed mid-epoch: the run notices within seconds, saves the
    state after its last step, and exits with 75 and one line saying what happened and how to
    resume: no hang, no traceback, no retry storm. A re-run resumes from that step."""
    cli = Cli(cli_env({**long_run, "train.epochs": 50}, harness=False), tmp_path)
    cli.wait_for_step(3)
    (server,) = [
        pid
        for pid in _children(cli.process.pid)
        if b"prefect\0server\0start" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    os.kill(server, signal.SIGKILL)
    killed, before = time.monotonic(), len(cli.lines)
    code = cli.finish(timeout=120)
    seconds = time.monotonic() - killed
    after = cli.lines[before:]
    assert code == EXIT_API_LOST, cli.output[-3000:]
    assert seconds < 30, (seconds, "".join(after))
    assert "Traceback" not in cli.output and "Error logging to API" not in cli.output
    last = after[-1]
    assert last.startswith("error: the Prefect API at ") and "stopped answering" in last, last
    (run_dir,) = Path(long_run["run.dir"]).iterdir()
    newest, state = load_newest_valid(RunDir(run_dir))
    saved = state["global_step"]
    assert saved == cli.last_step and f"newest checkpoint {newest}" in last, (saved, last)
    print(f"server killed: exit {code} {seconds:.1f} s later, {len(after)} lines after the kill")

    again = Cli(cli_env({**long_run, "train.epochs": 50}), tmp_path)
    again.wait_for_step(saved + 1)
    assert f"resumed after step {saved} (" in again.output
    signal_group(again, signal.SIGTERM)
    assert again.finish() == 128 + signal.SIGTERM


@pytest.mark.slow
def test_second_launch_on_a_running_run_is_refused_at_once_naming_the_holder(
    long_run: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """While one process trains a run, a second one started on the same folder exits 2 with
    one line naming the folder and the first one's PID, and writes nothing there."""
    env = cli_env({**long_run, "train.epochs": 50})
    first = Cli(env, tmp_path)
    first.wait_for_step(2)
    (run_dir,) = Path(long_run["run.dir"]).iterdir()
    second = Cli(env, tmp_path)
    assert second.finish() == 2, second.output[-3000:]
    last = second.output.strip().splitlines()[-1]
    assert last == (
        f"error: {run_dir} is in use by process {first.process.pid}, which is training this "
        "run; wait for it to end or stop it (a second process would interleave its "
        "checkpoints)"
    )
    assert "Task run" not in second.output  # refused before any task
    assert (run_dir / "lock").read_text().strip() == str(first.process.pid)
    signal_group(first, signal.SIGTERM)
    assert first.finish() == 128 + signal.SIGTERM


@pytest.mark.slow
def test_offline_without_data_ends_in_one_line_with_exit_2_and_leaves_no_run_folder(
    tiny: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """No data and a host name that cannot resolve: no retry, no traceback, a handful of
    lines (195 lines, the message 11 times, before), the message last; no run folder."""
    overrides = {
        **tiny,
        "data.root": str(tmp_path / "empty"),
        "data.url": "http://cifar.invalid/cifar-10-python.tar.gz",
        "run.dir": str(tmp_path / "runs"),
    }
    cli = Cli(cli_env(overrides), tmp_path)
    assert cli.finish() == 2
    lines = cli.output.strip().splitlines()
    assert "Traceback" not in cli.output and "Retrying" not in cli.output, cli.output
    assert lines[-1].startswith("error: could not download http://cifar.invalid/"), lines[-1]
    assert str(tmp_path / "empty" / "cifar-10-python.tar.gz") in lines[-1]
    assert len(lines) <= 10, cli.output
    assert not (tmp_path / "runs").exists()
    print(f"offline without data: {len(lines)} lines")

    debug = Cli(cli_env({**overrides, "run.debug": True}), tmp_path)
    assert debug.finish() == 2
    assert "Traceback" in debug.output  # run.debug shows where it came from


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"data.dataset": "folder", "data.folder": "missing"}, "no such folder: missing"),
        ({"data.subset": 10_000}, "data.subset is 10000 but"),
    ],
)
def test_errors_the_user_fixes_exit_2_with_one_line(
    tiny: dict[str, Any], change: dict[str, Any], names: str, capsys, monkeypatch
) -> None:
    """A missing image folder (found before anything starts) and a subset larger than the
    data: exit 2, the last line names the setting, and no run folder is left behind.
    (In-process, so the console may hold an earlier test's closed stream: the offline test
    above checks for tracebacks.)"""
    from flows.cli import main

    for key, value in {**tiny, **change}.items():
        monkeypatch.setenv("DDPM_" + key.upper().replace(".", "__"), str(value))
    assert main([]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and names in last, err
    assert not Path(tiny["run.dir"]).exists()


def test_temporary_server_is_out_of_the_run_group_and_sends_no_telemetry() -> None:
    """The server the CLI starts answers, lives in a session of its own (a signal to the run's
    group does not reach it), has telemetry off unless asked, and is gone after."""
    before = set(_children(os.getpid()))
    with temporary_server(timeout=120) as url:
        assert api_answers(url)
        (pid,) = set(_children(os.getpid())) - before
        assert os.getsid(pid) == pid != os.getsid(0)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"PREFECT_SERVER_ANALYTICS_ENABLED=false" in environ
    assert not api_answers(url) and pid not in _children(os.getpid())


def test_help_and_bad_flags_answer_before_torch_and_prefect_are_imported() -> None:
    """--help and a bad setting import neither torch nor prefect (which took 7 s to import
    before the flags were read): the answer comes at once, from the script and from the
    console scripts ddpm-train, ddpm-sample, ddpm-export and ddpm-sweep alike."""
    bin_dir = Path(sys.executable).parent
    commands = [
        (str(REPO / "flows" / "train_flow.py"), ["--train.epochs", "x"]),
        (str(bin_dir / "ddpm-train"), ["--train.epochs", "x"]),
        (str(bin_dir / "ddpm-sample"), ["--num", "x"]),
        (str(bin_dir / "ddpm-export"), ["--bogus", "x"]),
        (str(bin_dir / "ddpm-sweep"), ["--spec", "no-such-spec.yaml"]),
    ]
    for command, bad in commands:
        for args, code in ((["--help"], 0), (bad, 2)):
            result = subprocess.run(
                [sys.executable, "-X", "importtime", command, *args],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == code, (command, args, result.stderr[-2000:])
            imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
            assert {"torch", "prefect", "wandb"}.isdisjoint(imported), sorted(imported)[:50]
            assert "settings" in imported
