"""Sweeps (issue 28): `ddpm-sweep --spec` as a user runs it without a server (its own temporary
server, the trials' deployment served from this machine), a stopped and a killed sweep
resumed, a failed trial kept as a row, and a tpe trial pruned by the study in its database."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cli_run import REPO, Cli, signal_group
from prefect.client.orchestration import get_client
from run_records import flow_artifacts

from ddpm.checkpoint import load_checkpoint
from ddpm.files import write_checked
from ddpm.run_dir import RunDir
from flows.sweep.record import Trial
from flows.sweep.study import SweepStudy
from flows.sweep_flow import local_runner, sweep_flow
from flows.train_flow import train_flow
from settings.sweep import SweepSpec

SCRIPT = str(REPO / "flows" / "sweep_flow.py")


def write_spec(tmp_path: Path, cifar_writer, **spec: Any) -> Path:
    """A spec on the ddpm-smoke deployment (hidden 16, 256 images, CPU), its data written in
    CIFAR-10's format under tmp_path/data, W&B offline; `spec` adds to or replaces its keys."""
    cifar_writer(tmp_path / "data", images_per_batch=52)  # 260 >= the smoke run's 256
    base = {"data.root": str(tmp_path / "data"), "run.dir": str(tmp_path / "runs"),
            "wandb.mode": "offline", **spec.pop("base", {})}  # fmt: skip
    content = {"deployment": "train-flow/ddpm-smoke", "base": base, **spec}
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def record(tmp_path: Path, name: str) -> dict[str, dict[str, Any]]:
    saved = json.loads((tmp_path / "runs" / "sweeps" / name / "sweep.json").read_text())
    return {f"trial-{t['index']:03d}": t for t in saved["trials"]}


@pytest.mark.slow(seconds=50)
def test_a_grid_sweep_runs_its_trials_through_run_deployment_and_a_rerun_starts_nothing(
    tmp_path: Path, cifar_writer, wandb_records, task_runs
) -> None:
    """sweep_flow runs a 2-trial grid, 2 at once, as flow runs of the ddpm-smoke deployment
    (served from a child process, as ddpm-sweep does without a server): both trials Completed
    with their metric in the record and the returned table, checkpoints in their run folders,
    the plot on disk and as an image artifact after each trial, every trial's W&B run in the
    sweep's group and a W&B run of the sweep's own, each trial a subflow run of the sweep.
    Running it again starts no trial; a trial recorded as running (the sweep was killed) whose
    flow run has finished is read, not run again."""
    spec = write_spec(tmp_path, cifar_writer, name="lr", concurrency=2,
                      vary={"optim.lr": [1.0e-3, 2.0e-4]})  # fmt: skip
    folder = tmp_path / "runs" / "sweeps" / "lr"
    with local_runner("train-flow/ddpm-smoke", 2, 120, folder / "trials.log"):
        state = sweep_flow(str(spec), poll_seconds=0.5, return_state=True)
        result = state.result()
        again = sweep_flow(str(spec), poll_seconds=0.5, return_state=True)
        # A sweep killed while trial-001 ran; its worker finished it meanwhile: adopted, read.
        trials = record(tmp_path, "lr")
        saved = json.loads((folder / "sweep.json").read_text())
        saved["trials"][1].update(state="Running", metric=None, curve=[])
        write_checked(folder / "sweep.json", json.dumps(saved))  # as the sweep writes it
        adopted = sweep_flow(str(spec), poll_seconds=0.5, return_state=True)
    assert adopted.is_completed(), adopted.message
    assert record(tmp_path, "lr") == trials
    assert set(task_runs(adopted.state_details.flow_run_id)) == {"trial-result"}  # no new run
    assert [t["state"] for t in trials.values()] == ["Completed", "Completed"]
    assert [t["values"] for t in trials.values()] == [{"optim.lr": 1e-3}, {"optim.lr": 2e-4}]
    assert result["best"]["trial"] == min(trials, key=lambda name: trials[name]["metric"])
    for name, trial in trials.items():
        assert [epoch for epoch, _ in trial["curve"]] == [1, 2]  # the smoke run's 2 epochs
        assert trial["metric"] == trial["curve"][-1][1] > 0 and trial["images_per_s"] > 0
        run = RunDir(folder / name)
        assert [p.name for p in run.epoch_checkpoints()] == ["epoch_001.pt", "epoch_002.pt"]
        groups = {r.run.run_group for r in wandb_records(run.path) if r.HasField("run")}
        assert groups == {"lr"}
    rows = {row["trial"]: row for row in result["trials"]}
    assert rows["trial-001"]["optim.lr"] == 2e-4 and rows["trial-001"]["state"] == "Completed"
    assert rows["trial-001"]["wandb"] == "lr/trial-001 (offline)"
    assert (folder / "metric.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plots = flow_artifacts(state.state_details.flow_run_id)["sweep-lr-plot"]  # one per trial end
    assert [(a.type, a.data[:33]) for a in plots] == [
        ("image", "data:image/png;base64,iVBORw0KGgo")
    ] * 2
    sweep_runs = [r.run for r in wandb_records(folder / "wandb") if r.HasField("run")]
    assert {(r.run_group, r.job_type, r.display_name) for r in sweep_runs} == {
        ("lr", "sweep", "sweep-lr")
    }
    with get_client(sync_client=True) as client:
        for trial in trials.values():  # subflow runs of the sweep, under run_deployment's task
            parent = client.read_flow_run(trial["flow_run_id"]).parent_task_run_id
            assert client.read_task_run(parent).flow_run_id == state.state_details.flow_run_id
    assert again.result()["trials"] == result["trials"]
    assert set(task_runs(again.state_details.flow_run_id)) == set()  # none started, none read


@pytest.mark.slow(seconds=90)
def test_a_stopped_sweep_resumes_its_cancelled_trial_and_a_failed_trial_is_a_row(
    tmp_path: Path, cli_env, cifar_writer
) -> None:
    """SIGTERM to a running sweep cancels its running trial, which saves a checkpoint and ends
    Cancelled, and starts no further trial; the sweep exits 143. Re-run, it resumes that
    trial from its checkpoint to the end, then runs the next, whose failure (data.subset
    larger than the data) is a row saying why, and the sweep still ends 0."""
    spec = write_spec(tmp_path, cifar_writer, name="stop", concurrency=1,
                      base={"train.epochs": 12, "sample.every": 0},
                      vary={"data.subset": [256, 100000]})  # fmt: skip
    env = cli_env({}, harness=False)
    folder = tmp_path / "runs" / "sweeps" / "stop"
    cli = Cli(env, tmp_path, "--spec", str(spec), script=SCRIPT)
    first_epoch = folder / "trial-000" / "checkpoints" / "epoch_001.pt"
    deadline = time.monotonic() + 240
    while not first_epoch.exists():
        assert cli.process.poll() is None and time.monotonic() < deadline, cli.output[-4000:]
        time.sleep(0.1)
    signal_group(cli, signal.SIGTERM)
    assert cli.finish(timeout=200) == 128 + signal.SIGTERM, cli.output[-4000:]
    trials = record(tmp_path, "stop")
    assert list(trials) == ["trial-000"]  # the next trial never started
    assert trials["trial-000"]["state"] == "Cancelled", trials
    assert trials["trial-000"]["message"].startswith("SIGTERM received: stopped at step")
    assert "the sweep stopped; unfinished: trial-000, trial-001 (not started)" in cli.output
    run = RunDir(folder / "trial-000")
    saved = run.epoch_checkpoints() + run.step_checkpoints()
    assert saved and len(run.epoch_checkpoints()) < 12

    again = Cli(env, tmp_path, "--spec", str(spec), script=SCRIPT)
    assert again.finish(timeout=300) == 0, again.output[-4000:]
    trials = record(tmp_path, "stop")
    assert trials["trial-000"]["state"] == "Completed"
    assert [epoch for epoch, _ in trials["trial-000"]["curve"]] == list(range(1, 13))
    log = (folder / "trials.log").read_text()
    assert "Flow run 'stop-trial-000' - Finished in state Cancelled" in log
    assert "resumed after step" in log.split("Finished in state Cancelled")[1]
    failed = trials["trial-001"]
    assert failed["state"] == "Failed" and failed["metric"] is None
    assert "data.subset" in failed["message"], failed
    assert "trial-001  100000" in again.output and "Failed" in again.output


@pytest.mark.slow(seconds=85)
def test_a_killed_sweep_resumes_its_trial_from_the_checkpoint(
    tmp_path: Path, cli_env, cifar_writer
) -> None:
    """SIGKILL to the sweep's command takes its server and its served deployment down with it
    (nothing is left training the trial's folder); the same command then resumes the trial
    from the checkpoint it had written, and the trial completes every epoch."""
    spec = write_spec(tmp_path, cifar_writer, name="kill", base={"train.epochs": 6},
                      vary={"optim.lr": [1e-3]})  # fmt: skip
    env = cli_env({}, harness=False)
    run = RunDir(tmp_path / "runs" / "sweeps" / "kill" / "trial-000")
    cli = Cli(env, tmp_path, "--spec", str(spec), script=SCRIPT)
    deadline = time.monotonic() + 240
    while not run.epoch_checkpoint(1).exists():
        assert cli.process.poll() is None and time.monotonic() < deadline, cli.output[-4000:]
        time.sleep(0.1)
    signal_group(cli, signal.SIGKILL)
    cli.finish()
    assert record(tmp_path, "kill")["trial-000"]["state"] == "Running"
    deadline = time.monotonic() + 60  # the trial ends: the runner went with the sweep
    while not _free(run.lock_file):
        assert time.monotonic() < deadline, "the trial still holds its run folder"
        time.sleep(0.5)
    assert len(run.epoch_checkpoints()) < 6

    again = Cli(env, tmp_path, "--spec", str(spec), script=SCRIPT)
    assert again.finish(timeout=300) == 0, again.output[-4000:]
    trial = record(tmp_path, "kill")["trial-000"]
    log = (tmp_path / "runs" / "sweeps" / "kill" / "trials.log").read_text()
    assert trial["state"] == "Completed", f"{trial.get('message')}\n{log[-6000:]}"
    assert [epoch for epoch, _ in trial["curve"]] == [1, 2, 3, 4, 5, 6]
    assert log.count("Flow run 'kill-trial-000' - Beginning") == 2
    assert "resumed after step" in log


def _free(lock: Path) -> bool:
    """Whether no process holds the run folder's lock (ddpm.run_dir)."""
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def prune_spec(tmp_path: Path) -> SweepSpec:
    return SweepSpec(name="prune", search="tpe", trials=3, startup_trials=1, warmup_epochs=0,
                     vary={"optim.lr": [1e-3]})  # fmt: skip


def test_a_pruned_trial_stops_after_its_epoch_cancelled_with_its_checkpoint(
    tmp_path: Path, tiny: dict[str, Any]
) -> None:
    """A tpe trial (train-flow with sweep.*) creates its Optuna trial in the study's SQLite
    database, holding the values the sweep handed over, and reports each epoch's loss to it;
    after one trial that reached loss 0, the median pruner stops the next after its first
    epoch: Cancelled with the reason, epoch 1's checkpoint kept, no epoch 2. Run again with
    pruning off in the study, it resumes in a new Optuna trial that holds epoch 1 again and
    every epoch after (the old one fails), and trains to the end."""
    from optuna.trial import create_trial

    sweep = SweepStudy(prune_spec(tmp_path), tmp_path)
    sweep.study.add_trial(create_trial(params={"optim.lr": 1e-3}, distributions=sweep.space,
                                       value=0.0, intermediate_values={1: 0.0}))  # fmt: skip
    trial = Trial(1, {"optim.lr": 1e-3})
    sweep.hand_over(trial)
    where = {"sweep.storage": sweep.storage, "sweep.study": "prune", "sweep.trial": 1}
    run_pruned = {**tiny, **where, "run.name": "pruned", "train.epochs": 3}
    state = train_flow(overrides=run_pruned, return_state=True)
    assert state.is_cancelled(), state
    assert state.message.startswith(
        "pruned by sweep prune's median pruner after epoch 1 (epoch/loss "
    ), state.message
    run = RunDir(Path(tiny["run.dir"]) / "pruned")
    assert [p.name for p in run.epoch_checkpoints()] == ["epoch_001.pt"]
    first = sweep.number(trial)
    reported = sweep.study.trials[first]
    assert reported.params == {"optim.lr": 1e-3} and reported.user_attrs["sweep_trial"] == 1
    assert list(reported.intermediate_values) == [1] and reported.intermediate_values[1] > 0

    sweep.study.set_user_attr("prune", False)
    state = train_flow(overrides=run_pruned, return_state=True)
    assert state.is_completed(), state
    again = sweep.number(trial)
    assert again != first and sweep.study.trials[first].state.name == "FAIL"
    resumed = sweep.study.trials[again].intermediate_values  # epoch 1's from metrics.jsonl
    assert list(resumed) == [1, 2, 3]
    assert resumed[1] == pytest.approx(reported.intermediate_values[1], abs=1e-6)


@pytest.mark.slow(seconds=60)
def test_an_ema_length_sweep_scores_post_hoc_emas_of_a_trained_run_without_training(
    tmp_path: Path, tiny: dict[str, Any], weights: Path
) -> None:
    """A sweep on the ddpm-sample deployment (deployments/sweeps/ema-length.yaml's shape) over
    sigma_rel: each trial rebuilds its EMA length from the run's snapshots, draws into its own
    folder and scores the images; a trial's metric is the FID its metrics.json holds, at the
    checkpoint's epoch, the two lengths' weights and FIDs differ, the best is the lowest, and
    the run's checkpoints are unchanged (nothing trained)."""
    state = train_flow(overrides={**tiny, "train.ema_snapshots": 4}, return_state=True)
    assert state.is_completed(), state.message
    run = Path(state.result()["run_dir"])
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    base = {"run": str(run), "num": 6, "batch_size": 6, "eval.weights": str(weights),
            "eval.batch_size": 6, "eval.cache_dir": str(tmp_path / "fid-stats"),
            "run.dir": str(tmp_path / "runs")}  # fmt: skip
    spec = {"name": "ema-length", "deployment": "sample-flow/ddpm-sample", "metric": "eval/fid",
            "concurrency": 2, "base": base, "vary": {"sigma_rel": [0.05, 0.2]}}  # fmt: skip
    folder = tmp_path / "runs" / "sweeps" / "ema-length"
    with local_runner("sample-flow/ddpm-sample", 2, 120, folder / "trials.log"):
        result = sweep_flow(spec, poll_seconds=0.5)
    trials = record(tmp_path, "ema-length")
    assert [t["state"] for t in trials.values()] == ["Completed", "Completed"], trials
    fids = {}
    for name, trial in trials.items():
        scored = json.loads((folder / name / "metrics.json").read_text())
        assert scored["num"] == 6 and trial["metric"] == pytest.approx(scored["fid"], abs=1e-6)
        assert trial["best_epoch"] == 2 and len(list((folder / name).glob("*.png"))) == 6
        fids[trial["values"]["sigma_rel"]] = trial["metric"]
    assert fids[0.05] != fids[0.2]
    assert result["best"]["trial"] == min(trials, key=lambda name: trials[name]["metric"])
    rebuilt = [load_checkpoint(run / "ema" / f"sigma_rel_{s:.3f}.pt")["ema"] for s in (0.05, 0.2)]
    assert any(not torch.equal(rebuilt[0][k], rebuilt[1][k]) for k in rebuilt[0])
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_tpe_asks_within_the_spec_and_is_repeatable_from_its_seed(tmp_path: Path) -> None:
    """The tpe search's trials come from Optuna's TPE sampler over the spec's lists and ranges
    (log, integer): every value within them, and the same seed asks the same values."""
    spec = SweepSpec(name="ask", search="tpe", trials=6, seed=3,
                     vary={"optim.lr": {"low": 1e-5, "high": 1e-2, "log": True},
                           "model.hidden_size": {"low": 8, "high": 64, "integer": True},
                           "train.ema_decay": [0.99, 0.999]})  # fmt: skip
    asked = []
    for copy in ("a", "b"):
        sweep, started = SweepStudy(spec, tmp_path / copy), {}
        for index in range(6):  # all six running at once: none created its Optuna trial yet
            started[index] = sweep.ask(started)
        asked.append(list(started.values()))
    assert asked[0] == asked[1]
    for params in asked[0]:
        assert 1e-5 <= params["optim.lr"] <= 1e-2
        assert isinstance(params["model.hidden_size"], int) and params["model.hidden_size"] >= 8
        assert params["train.ema_decay"] in (0.99, 0.999)
    assert len({p["optim.lr"] for p in asked[0]}) == 6


def test_tpe_asks_and_prunes_as_if_the_sweep_asked_the_study_itself(tmp_path: Path) -> None:
    """Trials that create their own Optuna trials (TrialReport), here as late as they can (as
    they end, so in an order of their own), get the same values from the sweep's TPE sampler,
    and the median pruner stops the same ones, as when one process asks the study for each
    trial and reports to it (Optuna's ask and tell): 16 trials, 3 at once, a made-up loss
    over 3 epochs. (Trials asked of a copy in another order, as they were created, differ.)"""
    import math
    import random

    import optuna

    from flows.sweep.trial_report import TrialReport
    from settings import load_settings

    n, at_once = 16, 3
    spec = SweepSpec(name="same", search="tpe", trials=n, seed=1, startup_trials=3,
                     warmup_epochs=0, vary={"optim.lr": {"low": 1e-5, "high": 1e-2, "log": True},
                                            "model.hidden_size": [8, 16, 32, 64]})  # fmt: skip

    def loss(values: dict[str, Any], epoch: int) -> float:
        return (math.log10(values["optim.lr"]) + 3) ** 2 + values["model.hidden_size"] / 64 / epoch

    def run(start, end) -> list[tuple[dict[str, Any], str]]:
        """Start trials up to at_once; end one, chosen at random, at a time."""
        ends, running, ended = random.Random(0), {}, {}
        while len(ended) < n:
            while len(running) < at_once and len(running) + len(ended) < n:
                index = len(running) + len(ended)
                running[index] = start(index, {i: v for i, (v, _) in running.items()})
            index = ends.choice(sorted(running))
            ended[index] = end(index, *running.pop(index))
        return [ended[i] for i in range(n)]

    def one_process() -> list[tuple[dict[str, Any], str]]:
        sweep = SweepStudy(spec, tmp_path / "one")  # its sampler; the study asked directly
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
        study = optuna.load_study(study_name="same", storage=sweep.storage,
                                  sampler=sweep.sampler, pruner=pruner)  # fmt: skip

        def start(index, started):
            trial = study.ask(sweep.space)
            return trial.params, trial

        def end(index, values, trial):
            for epoch in (1, 2, 3):
                trial.report(loss(values, epoch), epoch)
                if trial.should_prune():
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    return values, "Pruned"
            study.tell(trial, loss(values, 3))
            return values, "Completed"

        return run(start, end)

    def trials_of_their_own() -> list[tuple[dict[str, Any], str]]:
        sweep = SweepStudy(spec, tmp_path / "own")

        def start(index, started):
            trial = Trial(index, sweep.ask(started))
            sweep.hand_over(trial)
            return trial.values, trial

        def end(index, values, trial):
            where = {"sweep.storage": sweep.storage, "sweep.study": "same", "sweep.trial": index}
            report = TrialReport(load_settings(where, env_file=None))
            epoch, pruned = 0, None
            while epoch < 3 and not pruned:
                epoch += 1
                pruned = report.pruned(epoch, loss(values, epoch), None)
            state = "Pruned" if pruned else "Completed"
            done = dataclasses.replace(trial, state=state, metric=loss(values, epoch))
            sweep.tell(dataclasses.replace(done, number=sweep.number(done)))
            return values, state

        return run(start, end)

    expected = one_process()
    assert trials_of_their_own() == expected
    assert 0 < sum(state == "Pruned" for _, state in expected) < n


@pytest.mark.parametrize("message", [None, "", "  \n"])
def test_a_trial_that_ended_without_a_message_is_a_row_not_a_crash(message: str | None) -> None:
    """A trial whose flow run ended Crashed with no message (a worker killed under it) is
    read as a Crashed row with an empty note; reading it used to fail the sweep with an
    IndexError, leaving the trial recorded as running."""
    from prefect import flow
    from prefect.states import Crashed

    from flows.sweep.trial_result import trial_result_task

    @flow(name="a-trial")
    def a_trial() -> None:
        pass

    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(a_trial)
        client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
    trial = trial_result_task.fn(Trial(0, {"optim.lr": 1e-3}, flow_run_id=str(flow_run.id)),
                                 "epoch/loss", "minimize")  # fmt: skip
    assert (trial.state, trial.message, trial.metric, trial.curve) == ("Crashed", "", None, [])


def test_a_running_trial_whose_heartbeats_stopped_is_silent() -> None:
    """A trial Running for longer than the silence window (SILENT_SECONDS; 8 s here, as the
    server stamps states itself) whose last heartbeat is older than that (its process or
    machine is gone: nothing would ever end it) is silent, and the sweep marks it Crashed;
    a recent heartbeat, or a flow run that never sent one (a deployment without
    heartbeats), is not."""
    import datetime
    import types

    from prefect import flow
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.states import Running

    from flows.sweep.schedule import HEARTBEAT, Sweep

    @flow(name="a-trial")
    def a_trial() -> None:
        pass

    def beat(flow_run_id: Any) -> None:
        emit_event(event=HEARTBEAT, occurred=datetime.datetime.now(datetime.UTC),
                   resource={"prefect.resource.id": f"prefect.flow-run.{flow_run_id}"})  # fmt: skip

    with get_client(sync_client=True) as client:
        runs = {name: client.create_flow_run(a_trial, name=name)
                for name in ("dead", "alive", "quiet")}  # fmt: skip
        for name, run in runs.items():
            client.set_flow_run_state(run.id, Running(), force=True)
            if name != "quiet":
                beat(run.id)
        time.sleep(9)  # Running for longer than the window, those heartbeats older
        beat(runs["alive"].id)
        EventsWorker.drain_all(timeout=10)
        sweep = types.SimpleNamespace(client=client, silent_seconds=8)
        deadline = time.monotonic() + 30  # the server stores events in batches, seconds later
        while Sweep._silent(sweep, client.read_flow_run(runs["alive"].id)):
            assert time.monotonic() < deadline, "the heartbeat never reached the server"
            time.sleep(0.5)
        silent = {name: Sweep._silent(sweep, client.read_flow_run(run.id))
                  for name, run in runs.items()}  # fmt: skip
    assert silent == {"dead": True, "alive": False, "quiet": False}
