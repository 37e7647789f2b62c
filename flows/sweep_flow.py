"""sweep_flow: many train-flow runs (trials) of one spec, compared side by side.

Run it with `ddpm-sweep --spec sweep.yaml` (= `python flows/sweep_flow.py --spec sweep.yaml`),
or as the `ddpm-sweep` deployment. Each trial is a real train-flow run started with
`run_deployment` (the spec's deployment), so trials spread over every worker of its pool and
show in the UI as the sweep's subflow runs; `concurrency` of them run at once.

The sweep keeps its state in runs/sweeps/<name>/sweep.json: re-running it starts only the
trials that have not finished (an unfinished one resumes from its checkpoint, as any run
does). A failed trial is a row that says why. SIGTERM or Ctrl-C cancels the running trials
(each saves a checkpoint) and ends the sweep. After each trial the `sweep-<name>` table
artifact is re-published; at the end, a plot of the metric per trial goes to the sweep's
folder and, with the table, to a W&B run in the sweep's group (which holds every trial's run).

tpe searches ask Optuna's TPE sampler for each trial's settings; the study lives in a database
every worker reaches (spec `storage`, default a SQLite file in the sweep's folder), where each
trial reports its metric every epoch and the median pruner may stop it (flows.trial_report):
a pruned trial ends Cancelled with the reason, its checkpoint kept.
"""

if __name__ == "__main__":
    import sys

    from flows.cli import sweep_main

    sys.exit(sweep_main())

import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect.client.schemas.sorting import ArtifactSort
from prefect.deployments import run_deployment
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling, Crashed, State

from ddpm.files import atomic_write, remove_partial_writes
from ddpm.run_dir import RunDir
from flows import children
from flows.shutdown import StopRequest, active_stop_request
from flows.sweep_record import FINISHED, Trial, claim, read_record, write_record
from flows.tracking import (
    LINK_KEY,
    METRICS_KEY,
    publish_sweep_plot,
    resolve_wandb_mode,
    wandb_run_id,
)
from settings import Settings, load_settings
from settings.sweep import (
    Range,
    SpecError,
    SweepSpec,
    planned,
    sample_trial,
    spec_from,
    trial_overrides,
)

__all__ = ["Trial", "local_runner", "sweep_flow"]

# A trial's flow run sends a heartbeat event every HEARTBEAT_SECONDS (Prefect's least; set for
# the served deployment here and the deployments of deployments/prefect.yaml). One Running but
# silent for SILENT_SECONDS has lost its process or its machine (a worker killed with it, a
# host down): nothing would ever end it, so the sweep marks it Crashed.
HEARTBEAT = "prefect.flow-run.heartbeat"
HEARTBEAT_SECONDS = 30
SILENT_SECONDS = 3 * HEARTBEAT_SECONDS  # three missed: as Prefect's docs detect zombie runs
# A trial that crashed (its process killed, its machine lost, the Prefect API gone) starts
# again, from its checkpoint, this many times before it is a row that says why.
TRIAL_RESTARTS = 2

# ---- a trial's result, read from its flow run ---------------------------------------------------


@task(name="trial-result", cache_policy=NO_CACHE)
def trial_result_task(trial: Trial, metric: str, goal: str) -> Trial:
    """The trial with its flow run's outcome: its state (Pruned for a pruner's stop), why it
    did not complete, the metric (the last epoch's, or the last evaluation's), its best
    epoch, mean images/s and W&B run, read from the flow run's epoch-metrics table artifact."""
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(trial.flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]),
                key=ArtifactFilterKey(any_=[METRICS_KEY, LINK_KEY]),
            ),
            sort=ArtifactSort.CREATED_DESC,
        )
    latest = {}
    for artifact in artifacts:  # newest first
        latest.setdefault(artifact.key, artifact.data)
    rows = latest.get(METRICS_KEY) or []
    rows = json.loads(rows) if isinstance(rows, str) else rows
    column = "loss" if metric == "epoch/loss" else metric.removeprefix("eval/")
    curve = [[row["epoch"], row[column]] for row in rows if row.get(column) is not None]
    state, message = flow_run.state.name, flow_run.state.message or ""
    if state == "Cancelled" and message.startswith("pruned"):
        state = "Pruned"
    best = (min if goal == "minimize" else max)(curve, key=lambda c: c[1]) if curve else None
    speeds = [row["images_per_s"] for row in rows if row.get("images_per_s")]
    return dataclasses.replace(
        trial,
        state=state,
        message="" if state == "Completed" else (message.strip().splitlines() or [""])[0][:300],
        metric=curve[-1][1] if curve else None,
        best_epoch=int(best[0]) if best else None,
        images_per_s=round(sum(speeds) / len(speeds), 1) if speeds else None,
        wandb=latest.get(LINK_KEY),
        curve=curve,
    )


# ---- comparing trials ------------------------------------------------------------------------


def table_rows(spec: SweepSpec, trials: Mapping[int, Trial], folder: Path) -> list[dict]:
    """One row per trial: the settings that differ, the metric, best epoch, img/s, state,
    run folder and W&B run (its link when online; else where its offline files are)."""
    rows = []
    for trial in (trials[i] for i in sorted(trials)):
        wandb = trial.wandb or f"{spec.name}/{trial.name} (offline)"
        if spec.draws_samples:
            wandb = ""  # sample_flow's trials log to no W&B run
        rows.append(
            {
                "trial": trial.name,
                **trial.values,
                spec.metric: None if trial.metric is None else round(trial.metric, 6),
                "best_epoch": trial.best_epoch,
                "images_per_s": trial.images_per_s,
                "state": trial.state,
                "run_dir": str(folder / trial.name),
                "wandb": wandb,
                "note": trial.message,
            }
        )
    return rows


def text_table(rows: list[dict]) -> str:
    """The rows as aligned text (the sweep's last log line), without the notes."""
    if not rows:
        return "(no trials)"
    columns = [c for c in rows[0] if c not in ("run_dir", "wandb", "note")]
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns]
             for r in rows]  # fmt: skip
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def plot(spec: SweepSpec, trials: Mapping[int, Trial], path: Path) -> Path:
    """The metric of each trial by epoch (left) and its final value (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (by_epoch, final) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    names, values, colours = [], [], []
    colour = {"Completed": "tab:blue", "Pruned": "tab:orange"}
    for trial in (trials[i] for i in sorted(trials)):
        if trial.curve:
            epochs, metric = zip(*trial.curve, strict=True)
            by_epoch.plot(epochs, metric, marker="o", label=trial.name)
        names.append(trial.name)
        values.append(trial.metric if trial.metric is not None else math.nan)
        colours.append(colour.get(trial.state, "tab:red"))
    by_epoch.set(xlabel="epoch", ylabel=spec.metric, title=f"sweep {spec.name}: by epoch")
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(t.curve for t in trials.values()):
        by_epoch.legend(fontsize="small")
    final.bar(names, values, color=colours)
    final.set(ylabel=spec.metric, title="last value (orange: pruned, red: did not finish)")
    final.tick_params(axis="x", labelrotation=60, labelsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def log_to_wandb(cfg: Settings, spec: SweepSpec, folder: Path, rows: list[dict], png: Path) -> None:
    """The table and the plot in a W&B run `sweep-<name>` of the sweep's group (job type
    sweep), resumed across re-runs of the sweep."""
    mode = resolve_wandb_mode(cfg.wandb.mode)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(
        project=cfg.wandb.project, entity=cfg.wandb.entity, group=spec.name,
        name=f"sweep-{spec.name}", job_type="sweep", id=wandb_run_id(folder / "wandb_id.txt"),
        resume="allow", dir=os.environ.get("WANDB_DIR") or str(folder), mode=mode,
        config=spec.model_dump(mode="json"),
        settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False),
    )  # fmt: skip
    columns = list(rows[0]) if rows else []
    table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
    run.log({"sweep/trials": table, "sweep/plot": wandb.Image(str(png), caption=spec.metric)})
    run.finish()


# ---- the sweep ---------------------------------------------------------------------------------


def open_study(spec: SweepSpec, folder: Path) -> tuple[Any, str]:
    """The tpe search's Optuna study (created, or loaded to continue), with the rules its
    trials prune by in its user attributes (flows.trial_report), and its database URL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    storage = spec.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        direction=spec.goal,
        sampler=optuna.samplers.TPESampler(
            seed=spec.seed, n_startup_trials=spec.startup_trials, constant_liar=True
        ),
        load_if_exists=True,
    )
    rules = {"metric": spec.metric, "prune": spec.prune, "startup_trials": spec.startup_trials,
             "warmup_epochs": spec.warmup_epochs}  # fmt: skip
    for key, value in rules.items():
        study.set_user_attr(key, value)
    return study, storage


def _distributions(spec: SweepSpec) -> dict[str, Any]:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    def one(how: list[Any] | Range) -> Any:
        if isinstance(how, list):
            return CategoricalDistribution(how)
        if how.integer:
            return IntDistribution(round(how.low), round(how.high), log=how.log)
        return FloatDistribution(how.low, how.high, log=how.log)

    return {key: one(how) for key, how in spec.vary.items()}


class Sweep:
    """Starts trials up to the spec's concurrency, records each as it ends, stops on request."""

    silent_seconds: float = SILENT_SECONDS  # a Running trial with no heartbeat this long is gone

    def __init__(
        self,
        spec: SweepSpec,
        folder: Path,
        client: SyncPrefectClient,
        stop: StopRequest,
        adopt: bool,
    ) -> None:
        self.spec, self.folder, self.client, self.stop = spec, folder, client, stop
        self.trials = read_record(folder, spec)
        self.study, self.storage = (None, None)
        if spec.search == "tpe":
            self.study, self.storage = open_study(spec, folder)
        self.running: dict[str, Trial] = {}
        self._checked: dict[str, float] = {}  # flow run id -> when its heartbeat was checked
        self.logger = get_run_logger()
        unfinished = [t for _, t in sorted(self.trials.items()) if t.state not in FINISHED]
        self.todo = [t for t in unfinished if not (adopt and self._adopted(t))]
        self.todo += [Trial(i, values) for i, values in enumerate(planned(spec))
                      if i not in self.trials]  # fmt: skip
        self.todo.sort(key=lambda t: t.index)

    def _adopted(self, trial: Trial) -> bool:
        """Whether a trial that was running when a previous run of the sweep ended is still
        known to the server: watched again if it still runs, recorded if it has ended (a
        killed sweep leaves its trials running on their workers). Else it starts again."""
        if trial.state != "Running" or trial.flow_run_id is None:
            return False
        try:
            flow_run = self.client.read_flow_run(trial.flow_run_id)
        except ObjectNotFound:  # another server (a temporary one): start it again
            return False
        if flow_run.state.is_final() and not flow_run.state.is_completed():
            return False  # failed, crashed or cancelled: start it again, from its checkpoint
        self.logger.info("%s: flow run %s is %s; watching it", trial.name, flow_run.name,
                         flow_run.state.name)  # fmt: skip
        self.running[trial.flow_run_id] = trial
        return True

    def _next(self) -> Trial | None:
        if self.todo:
            return self.todo.pop(0)
        if self.study is None or len(self.trials) >= (self.spec.trials or 0):
            return None
        asked = self.study.ask(_distributions(self.spec))
        return Trial(len(self.trials), dict(asked.params), number=asked.number)

    def _start(self, trial: Trial) -> None:
        parameters: dict[str, Any] = {}
        if self.spec.draws_samples:
            parameters["options"], overrides = sample_trial(self.spec, trial.index, trial.values)
        else:
            overrides = trial_overrides(self.spec, trial.index, trial.values)
        overrides["wandb.group"] = self.spec.name
        if self.study is not None:
            where = {"storage": self.storage, "study": self.spec.name, "trial": trial.number}
            overrides.update({f"sweep.{key}": value for key, value in where.items()})
        flow_run = run_deployment(
            self.spec.deployment,
            parameters={**parameters, "overrides": overrides},
            flow_run_name=f"{self.spec.name}-{trial.name}",
            tags=["sweep", f"sweep-{self.spec.name}"],
            timeout=0,  # started; this loop watches it
        )
        trial = dataclasses.replace(
            trial, flow_run_id=str(flow_run.id), state="Running", message="",
            metric=None, best_epoch=None, images_per_s=None, curve=[],
        )  # fmt: skip
        self.trials[trial.index] = self.running[trial.flow_run_id] = trial
        write_record(self.folder, self.spec, self.trials)
        self.logger.info("%s started: %s (flow run %s)", trial.name, trial.values, flow_run.name)

    def _finish(self, trial: Trial) -> None:
        trial = trial_result_task(trial, self.spec.metric, self.spec.goal)
        if trial.state == "Crashed" and trial.restarts < TRIAL_RESTARTS and not self.stop():
            self.logger.warning("%s crashed (%s); starting it again (%d of %d), from its "
                                "checkpoint", trial.name, trial.message or "no message",
                                trial.restarts + 1, TRIAL_RESTARTS)  # fmt: skip
            self.todo.insert(0, dataclasses.replace(trial, restarts=trial.restarts + 1))
        self.trials[trial.index] = trial
        if self.study is not None:
            self._tell(trial)
        write_record(self.folder, self.spec, self.trials)
        rows = table_rows(self.spec, self.trials, self.folder)
        create_table_artifact(rows, key=f"sweep-{self.spec.name}",
                              description=f"sweep {self.spec.name}: one row per trial")  # fmt: skip
        png = plot(self.spec, self.trials, self.folder / "metric.png")  # redrawn per trial
        publish_sweep_plot(png, self.spec.name, self.spec.metric)
        self.logger.info(
            "%s %s: %s %s%s", trial.name, trial.state, self.spec.metric, trial.metric,
            f" ({trial.message})" if trial.message else "",
        )  # fmt: skip

    def _tell(self, trial: Trial) -> None:
        """Tell the study how a finished trial ended; one that failed, crashed or was
        cancelled stays running in the study, as a re-run of the sweep runs it again."""
        from optuna.trial import TrialState

        if trial.state not in FINISHED or trial.number is None:
            return
        with contextlib.suppress(RuntimeError):  # already told (a re-run of a told trial)
            if trial.state == "Pruned":
                self.study.tell(trial.number, state=TrialState.PRUNED)
            elif trial.metric is not None:
                self.study.tell(trial.number, trial.metric)
            else:
                self.study.tell(trial.number, state=TrialState.FAIL)

    def _cancel_running(self) -> None:
        for flow_run_id in self.running:
            flow_run = self.client.read_flow_run(flow_run_id)
            state = (Cancelling if flow_run.state.is_running() else Cancelled)(
                message=f"the sweep {self.spec.name} was stopped ({self.stop.reason})"
            )
            self.client.set_flow_run_state(flow_run_id, state, force=True)
        self.logger.info("cancelled %d running trial(s): %s", len(self.running),
                         ", ".join(t.name for t in self.running.values()))  # fmt: skip

    def _silent(self, flow_run: Any) -> bool:
        """Whether a trial's flow run is Running but has sent no heartbeat for silent_seconds,
        though it did send them (a deployment without heartbeats is never judged)."""
        state, window = flow_run.state, self.silent_seconds
        now = datetime.datetime.now(datetime.UTC)
        if not state.is_running() or (now - state.timestamp).total_seconds() < window:
            return False

        def heartbeats(since: datetime.datetime) -> bool:
            found = self.client.read_events(filter=EventFilter(
                event=EventNameFilter(name=[HEARTBEAT]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run.id}"]),
                occurred=EventOccurredFilter(since=since),
            ), limit=1)  # fmt: skip
            return bool(found.events)

        silent = datetime.timedelta(seconds=window)
        return not heartbeats(now - silent) and heartbeats(state.timestamp - silent)

    def _check(self, flow_run_id: str) -> bool:
        """Whether a running trial has ended; one that went silent is marked Crashed first."""
        flow_run = self.client.read_flow_run(flow_run_id)
        if flow_run.state.is_final():
            return True
        if time.monotonic() - self._checked.get(flow_run_id, 0.0) < HEARTBEAT_SECONDS / 3:
            return False
        self._checked[flow_run_id] = time.monotonic()
        if not self._silent(flow_run):
            return False
        message = (f"no heartbeat for {self.silent_seconds:g} s: its process or machine is gone "
                   f"(marked by the sweep {self.spec.name})")  # fmt: skip
        self.client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
        self.logger.warning("%s: %s", self.running[flow_run_id].name, message)
        return True

    def run(self, poll_seconds: float, stop_grace: float) -> None:
        """Start trials up to the concurrency, and record each as it ends, until none is left
        or a stop request: then the running trials are cancelled, and those not ended
        `stop_grace` seconds later are marked Cancelled."""
        cancelled_at = None
        while True:
            while not self.stop() and len(self.running) < self.spec.concurrency:
                trial = self._next()
                if trial is None:
                    break
                self._start(trial)
            if not self.running:
                return
            if self.stop() and cancelled_at is None:
                self._cancel_running()
                cancelled_at = time.monotonic()
            if cancelled_at is not None and time.monotonic() - cancelled_at > stop_grace:
                for flow_run_id in self.running:  # gone, or not stopping: ended here
                    message = f"did not stop within {stop_grace:g} s of the sweep's stop"
                    self.client.set_flow_run_state(flow_run_id, Cancelled(message=message),
                                                   force=True)  # fmt: skip
            time.sleep(poll_seconds)
            for flow_run_id, trial in list(self.running.items()):
                if self._check(flow_run_id):
                    del self.running[flow_run_id]
                    self._finish(trial)


@flow(name="sweep-flow", description="Run many train-flow runs of one spec and compare them.")
def sweep_flow(
    spec: str | dict[str, Any], poll_seconds: float = 2.0, adopt: bool = True
) -> dict[str, Any] | State:
    """Run the sweep a spec describes (its YAML file, or the spec itself as a mapping).

    Args:
        poll_seconds: between two reads of the running trials' states.
        adopt: watch the trials a killed run of this sweep left running on their workers,
            instead of starting them again; off where they died with it (ddpm-sweep without
            a server: its served deployment went with it, though the server's records may
            still say Running).

    Returns:
        the sweep's folder, its table (one row per trial) and its best completed trial; a
        Cancelled state naming the unfinished trials when a stop request ended it.

    Raises:
        SpecError: for a bad spec (one line naming the key), a folder holding another sweep,
            or a deployment the server does not have.
    """
    logger = get_run_logger()
    sweep = spec_from(spec)
    cfg = load_settings(sweep.settings_base)
    folder = claim(sweep)  # a folder of the user's is refused, untouched
    stop = active_stop_request() or StopRequest(cfg.run.stop_timeout)
    with (
        stop.signals_handled(),
        RunDir(folder).locked(doing="running this sweep"),
        get_client(sync_client=True) as client,
    ):
        remove_partial_writes(folder)  # a killed write's, now the lock is ours
        try:
            client.read_deployment_by_name(sweep.deployment)
        except ObjectNotFound:
            raise SpecError(
                f"deployment: the Prefect server has no deployment {sweep.deployment} (deploy "
                "it: prefect deploy --all --prefect-file deployments/prefect.yaml)"
            ) from None
        runner = Sweep(sweep, folder, client, stop, adopt)
        logger.info("sweep %s: %s search, %s at once, folder %s", sweep.name, sweep.search,
                    sweep.concurrency, folder)  # fmt: skip
        error = None
        try:
            runner.run(poll_seconds, stop_grace=cfg.run.stop_timeout + 20)
        except BaseException as err:
            error = err
            raise
        finally:
            trials = runner.trials
            rows = table_rows(sweep, trials, folder)
            png = folder / "metric.png"
            try:
                plot(sweep, trials, png)
                log_to_wandb(cfg, sweep, folder, rows, png)
            except Exception as late:
                if error is None:
                    raise
                # The error under way says what went wrong; this one must not hide it.
                logger.warning("could not draw the plot or log to W&B either: %s", late)
    logger.info("sweep %s:\n%s\nplot: %s", sweep.name, text_table(rows), png)
    if stop():
        left = [t.name for t in trials.values() if t.state not in FINISHED]
        left += [f"{t.name} (not started)" for t in runner.todo]
        return Cancelled(
            message=f"{stop.reason}: the sweep stopped; unfinished: {', '.join(left) or 'none'}"
            "; re-run it to continue"
        )
    done = [r for r in rows if r[sweep.metric] is not None and r["state"] == "Completed"]
    done.sort(key=lambda r: r[sweep.metric], reverse=sweep.goal == "maximize")
    return {"folder": str(folder), "best": done[0] if done else None, "trials": rows}


# ---- trials without a server: served from this machine ------------------------------------------


@contextlib.contextmanager
def local_runner(deployment: str, limit: int, timeout: float, log: Path) -> Iterator[None]:
    """Serve the deployment from a child process (`ddpm-serve --deployment NAME --limit N`)
    against the current Prefect API, for a sweep run without a server and workers of its own;
    its output (the trials' logs) goes to `log`; stop it at the end (SIGINT, then SIGKILL to it
    and every process it started after 30 s), or when this process dies, however it dies
    (SIGINT, the parent-death signal: flows.children).

    Raises:
        SpecError: naming `deployment` if it did not appear within `timeout` seconds.
    """
    from prefect.settings import PREFECT_API_URL

    env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS), **os.environ,
           "PREFECT_API_URL": PREFECT_API_URL.value()}  # fmt: skip
    command = [sys.executable, "-m", "deployments.serve", "--deployment", deployment,
               "--limit", str(limit)]  # fmt: skip
    print(f"serving {deployment} here for the trials; their logs: {log}", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(get_client(sync_client=True))

        def served() -> bool:
            try:
                client.read_deployment_by_name(deployment)
            except ObjectNotFound:
                return False
            return True

        # SIGINT: its SIGTERM handler fails (Prefect 3.8.8); after 30 s, SIGKILL to it and to
        # every process it started (the trials' flow runs run in sessions of their own).
        runner = children.running(command, env=env, ready=served, timeout=timeout, log=log,
                                  stop_signal=signal.SIGINT, grace=30)  # fmt: skip
        try:
            stack.enter_context(runner)
        except children.StartError as err:
            how = (f"took over {timeout:g} s" if err.returncode is None
                   else f"exited with status {err.returncode}")  # fmt: skip
            raise SpecError(
                f"deployment: {deployment} could not be served here (ddpm-serve {how}; its "
                f"output: {log})"
            ) from None
        yield
