"""A sweep's folder and its record, runs/sweeps/<name>/sweep.json: what each trial ran and how
it ended, so that running the sweep again continues it (flows.sweep.schedule).

No Prefect here: `ddpm-sweep` checks the folder before it starts a server.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ddpm.files import DamagedFile, claim_folder, damaged, read_json, write_checked
from settings.sweep import SpecError, SweepSpec, trial_overrides

RECORD = "sweep.json"
FINISHED = ("Completed", "Pruned")  # a re-run of the sweep skips these
# What a sweep writes in its folder before its record exists: its lock, and the trials' log
# (ddpm-sweep's served deployment opens it before the sweep starts).
_BEFORE_RECORD = ("lock", "trials.log", RECORD + ".sha256")
_FIX = (
    "restore it, or remove it to run the sweep's trials again (each resumes from its own "
    "checkpoint, and a finished one does nothing)"
)


@dataclasses.dataclass
class Trial:
    """One trial: its varied settings, where it runs, and how it ended."""

    index: int
    values: dict[str, Any]
    number: int | None = None  # its Optuna trial (tpe)
    flow_run_id: str | None = None
    state: str = "Not started"  # Running, Completed, Pruned, Failed, Crashed, Cancelled
    message: str = ""
    metric: float | None = None  # the spec's metric: the last epoch's (or evaluation's)
    best_epoch: int | None = None
    images_per_s: float | None = None
    wandb: str | None = None
    curve: list[list[float]] = dataclasses.field(default_factory=list)  # [epoch, metric]
    restarts: int = 0  # times it was started again after it crashed

    @property
    def name(self) -> str:
        return f"trial-{self.index:03d}"


def sweep_folder(spec: SweepSpec) -> Path:
    """runs/sweeps/<name> (under base's run.dir): the trials' run folders and the record."""
    return Path(trial_overrides(spec, 0, {})["run.dir"])


def claim(spec: SweepSpec) -> Path:
    """The sweep's folder, checked to be new, empty or this sweep's, with a record written
    when it has none (so that everything the sweep writes after lies in a folder marked as a
    sweep's).

    Raises:
        NotOurs: naming the folder, if it holds files that are not a sweep's; untouched.
        SpecError: if it holds a sweep made from another spec.
        DamagedFile: if its record is damaged.
    """
    folder = sweep_folder(spec)
    if not claim_folder(folder, RECORD, "a sweep's", _BEFORE_RECORD, "the spec's name"):
        write_record(folder, spec, {})
    read_record(folder, spec)
    return folder


def _comparable(spec: SweepSpec) -> dict[str, Any]:
    """What a re-run must keep to continue a sweep (it may change trials and concurrency)."""
    return spec.model_dump(mode="json", exclude={"trials", "concurrency"})


def read_record(folder: Path, spec: SweepSpec) -> dict[int, Trial]:
    """The trials a previous run of this sweep recorded, by index.

    Raises:
        SpecError: if the folder holds a sweep made from another spec.
        DamagedFile: naming the record, if it is not one (torn, edited, another file).
    """
    path = folder / RECORD
    try:
        saved = read_json(path, _FIX)
    except FileNotFoundError:
        return {}
    if not isinstance(saved.get("spec"), dict) or not isinstance(saved.get("trials"), list):
        raise damaged(path, "no spec and trials in it", _FIX)
    now = _comparable(spec)
    if saved["spec"] != now:
        changed = sorted(k for k in saved["spec"] if saved["spec"][k] != now.get(k))
        raise SpecError(
            f"name: {folder} holds sweep {spec.name} made from another spec (it differs in "
            f"{', '.join(changed)}); pick another name, or remove the folder to start over"
        )
    try:
        trials = [Trial(**t) for t in saved["trials"]]
        if not all(isinstance(t.index, int) and isinstance(t.values, dict) for t in trials):
            raise TypeError("a trial without an index or values")
    except TypeError as err:
        raise DamagedFile(f"{path} is damaged ({err}); {_FIX}") from None
    return {t.index: t for t in trials}


def write_record(folder: Path, spec: SweepSpec, trials: Mapping[int, Trial]) -> None:
    """Atomically write the record: the spec's comparable part and every trial."""
    record = {
        "spec": _comparable(spec),
        "trials": [dataclasses.asdict(trials[i]) for i in sorted(trials)],
    }
    write_checked(folder / RECORD, json.dumps(record, indent=1))
