"""Serve the deployments of train-flow, sample-flow, export-flow, ema-flow, prepare-flow and
sweep-flow from this process, for users without a worker:

    python deployments/serve.py
    prefect deployment run 'train-flow/ddpm-smoke'
    prefect deployment run 'sample-flow/ddpm-sample' \
        --param options='{"run": "runs/NAME", "num": 64, "out": "samples/NAME"}'

The deployments are the ones in deployments/prefect.yaml. Served runs execute in this process's
environment, so each deployment's DDPM_* job variables become its default `overrides` here; as
with any parameter, run-time `overrides` replace them as a whole. `--deployment NAME` serves one
deployment with its job variables in this process's environment instead, so run-time overrides
add to them as they do on a worker (a sweep without a server serves its trials' deployment so;
flows.sweep_flow), and `--limit N` runs at most N flow runs at once.
"""

import argparse
import os
from pathlib import Path

import yaml

from settings import setting_name

PREFECT_FILE = Path(__file__).with_name("prefect.yaml")


def served_deployments(only: str | None = None) -> list:
    """prefect.yaml's deployments, with their DDPM_* env folded into `overrides`; or the one
    named `only` ("flow-name/deployment-name" or "deployment-name"), its env set in this
    process's environment (os.environ), as a worker sets a flow run's.

    Raises:
        SystemExit: if no deployment is named `only`.
    """
    from flows.ema_flow import ema_flow
    from flows.export_flow import export_flow
    from flows.prepare_flow import prepare_flow
    from flows.sample_flow import sample_flow  # prefect, torch: seconds
    from flows.sweep_flow import sweep_flow
    from flows.train_flow import train_flow

    flows = {
        "flows/train_flow.py:train_flow": train_flow,
        "flows/sample_flow.py:sample_flow": sample_flow,
        "flows/export_flow.py:export_flow": export_flow,
        "flows/ema_flow.py:ema_flow": ema_flow,
        "flows/prepare_flow.py:prepare_flow": prepare_flow,
        "flows/sweep_flow.py:sweep_flow": sweep_flow,
    }
    deployments, name = [], only and only.rpartition("/")[2]
    for spec in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]:
        if name and spec["name"] != name:
            continue
        env = spec.get("work_pool", {}).get("job_variables", {}).get("env", {})
        if name:
            os.environ.update({key: str(value) for key, value in env.items()})
            env = {}
        overrides = {
            setting_name(name): value for name, value in env.items() if name.startswith("DDPM_")
        }
        parameters = dict(spec.get("parameters") or {})
        overrides.update(parameters.get("overrides", {}))
        if overrides:
            parameters["overrides"] = overrides
        deployments.append(
            flows[spec["entrypoint"]].to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=parameters,
            )
        )
    if name and not deployments:
        raise SystemExit(f"ddpm-serve: no deployment named {only} in {PREFECT_FILE}")
    return deployments


def main(argv: list[str] | None = None) -> None:
    """`ddpm-serve` / `python deployments/serve.py`: serve the deployments until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="ddpm-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployment", help="serve only this one, e.g. train-flow/ddpm-smoke")
    parser.add_argument("--limit", type=int, help="flow runs at once (default: no limit)")
    args = parser.parse_args(argv)
    from prefect import serve

    serve(*served_deployments(args.deployment), limit=args.limit)


if __name__ == "__main__":
    main()
