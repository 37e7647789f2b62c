"""Scheduling a sweep's trials: each is a flow run of the spec's deployment started with
Prefect's `run_deployment`, so trials spread over every worker of its pool; up to the spec's
concurrency run at once. Each is recorded (flows.sweep.record) as it starts and as it ends, and
the table artifact re-published; one whose heartbeats stopped is marked Crashed and, up to
TRIAL_RESTARTS times, started again from its checkpoint; a stop request cancels the running
ones."""

from __future__ import annotations

import dataclasses
import datetime
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import SyncPrefectClient
from prefect.deployments import run_deployment
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling, Crashed

from flows.shutdown import StopRequest
from flows.sweep.record import FINISHED, Trial, read_record, write_record
from flows.sweep.report import plot, table_rows
from flows.sweep.study import SweepStudy
from flows.sweep.trial_result import trial_result_task
from flows.tracking import publish_sweep_plot
from settings.sweep import SweepSpec, planned, sample_trial, trial_overrides

# A trial's flow run sends a heartbeat event every HEARTBEAT_SECONDS (Prefect's least; set for
# the served deployment of flows.sweep_flow.local_runner and the deployments of
# deployments/prefect.yaml). One Running but silent for SILENT_SECONDS has lost its process or
# its machine (a worker killed with it, a host down): nothing would ever end it, so the sweep
# marks it Crashed.
HEARTBEAT = "prefect.flow-run.heartbeat"
HEARTBEAT_SECONDS = 30
SILENT_SECONDS = 3 * HEARTBEAT_SECONDS  # three missed: as Prefect's docs detect zombie runs
# A trial that crashed (its process killed, its machine lost, the Prefect API gone) starts
# again, from its checkpoint, this many times before it is a row that says why.
TRIAL_RESTARTS = 2


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
        self.study = SweepStudy(spec, folder) if spec.search == "tpe" else None
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
        started = {trial.index: trial.values for trial in self.running.values()}
        return Trial(len(self.trials), self.study.ask(started))

    def _start(self, trial: Trial) -> None:
        parameters: dict[str, Any] = {}
        if self.spec.draws_samples:
            parameters["options"], overrides = sample_trial(self.spec, trial.index, trial.values)
        else:
            overrides = trial_overrides(self.spec, trial.index, trial.values)
        overrides["wandb.group"] = self.spec.name
        if self.study is not None:  # the trial creates its Optuna trial (flows.sweep.study)
            self.study.hand_over(trial)
            where = {"storage": self.study.storage, "study": self.spec.name, "trial": trial.index}
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
        if self.study is not None:
            trial = dataclasses.replace(trial, number=self.study.number(trial))
        if trial.state == "Crashed" and trial.restarts < TRIAL_RESTARTS and not self.stop():
            self.logger.warning("%s crashed (%s); starting it again (%d of %d), from its "
                                "checkpoint", trial.name, trial.message or "no message",
                                trial.restarts + 1, TRIAL_RESTARTS)  # fmt: skip
            self.todo.insert(0, dataclasses.replace(trial, restarts=trial.restarts + 1))
        self.trials[trial.index] = trial
        if self.study is not None:
            self.study.tell(trial)
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
