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

tpe searches ask Optuna's TPE sampler for each trial's settings (flows.sweep.study); the study
lives in a database every worker reaches (spec `storage`, default a SQLite file in the sweep's
folder), where each trial reports its metric every epoch and the median pruner may stop it
(flows.sweep.trial_report): a pruned trial ends Cancelled with the reason, its checkpoint kept.

The sweep's parts are in flows.sweep: scheduling the trials (schedule), reading a trial's
result (trial_result), the record (record), the table, plot and W&B run (report) and the
study (study).
"""

if __name__ == "__main__":
    import sys

    from flows.cli import sweep_main

    sys.exit(sweep_main())

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, State

from ddpm.files import remove_partial_writes
from ddpm.run_dir import RunDir
from flows import children
from flows.shutdown import StopRequest, active_stop_request
from flows.sweep.record import FINISHED, claim
from flows.sweep.report import log_to_wandb, plot, table_rows, text_table
from flows.sweep.schedule import HEARTBEAT_SECONDS, Sweep
from settings import load_settings
from settings.sweep import SpecError, spec_from

__all__ = ["local_runner", "sweep_flow"]


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
