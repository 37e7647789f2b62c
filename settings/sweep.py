"""A sweep's spec (`--spec sweep.yaml`, issue 28), validated, and the trials of its grid and
random searches.

    name: lr-width                      # runs/sweeps/<name>, its W&B group, artifact sweep-<name>
    deployment: train-flow/ddpm-smoke   # what each trial runs
    metric: epoch/loss                  # or eval/fid, eval/kid
    goal: minimize
    search: grid                        # grid | random | tpe
    trials: 8                           # random and tpe only
    concurrency: 4                      # trials running at once
    seed: 0
    base: {train.epochs: 2}             # overrides every trial gets
    # tpe only: the Optuna study's database (default: a file in the sweep's folder), random
    # trials before TPE models the results and completed trials before the median pruner
    # compares, epochs a trial trains before it may be pruned, and whether to prune at all.
    storage: postgresql+psycopg://optuna@db-host/optuna
    startup_trials: 4
    warmup_epochs: 1
    prune: true
    vary:
      optim.lr: [1.0e-4, 2.0e-4]        # a list: the choices
      train.ema_decay: {low: 0.99, high: 0.9999, log: true}   # a range: random and tpe only

Every key of `base` and `vary` is a setting (as a flag names it); each trial's settings are
validated before the sweep starts, so a bad value is named before any trial runs.

A spec whose deployment is a sample-flow's scores trained runs without training (an EMA length,
a sampler and its steps): each trial draws `num` images into runs/sweeps/<name>/trial-<i> and
scores them (eval/fid or eval/kid); its keys are sample_flow's options (run, num, seed, sampler,
steps, sigma_rel, ...) and the sample.*, eval.*, run.* and wandb.* settings:

    name: ema-length
    deployment: sample-flow/ddpm-sample
    metric: eval/fid
    base: {run: runs/RUN, num: 10000}
    vary:
      sigma_rel: [0.05, 0.075, 0.10, 0.15, 0.20]   # post-hoc EMA lengths (train.ema_snapshots)
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ddpm.errors import UserError
from settings.fields import PGPASSWORD_INSTEAD, no_password
from settings.loading import SettingsError, load_settings, one_line
from settings.sampling import GenerateOptions, OptionsError, generate_options


class SpecError(UserError, ValueError):
    """An invalid sweep spec; the message names the file and the key."""


SAMPLE_FLOW = "sample-flow"  # a deployment of this flow scores trained runs (sample_trial)
SAMPLE_TRIAL_SETTINGS = ("sample.", "eval.", "run.", "wandb.")  # a sample-flow trial's settings
SAMPLE_TRIAL_SETS = ("out", "evaluate", "npz")  # options the sweep sets for each trial itself


def sample_options() -> list[str]:
    """The sample_flow options a sample-flow trial's spec may give."""
    return [name for name in GenerateOptions.model_fields if name not in SAMPLE_TRIAL_SETS]


class Range(BaseModel):
    """A range to draw from: uniform in [low, high], or log-uniform (log: true)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    low: float
    high: float
    log: bool = False
    integer: bool = False  # draw whole numbers (e.g. model.hidden_size)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    def draw(self, rng: random.Random) -> float | int:
        """One value, from rng."""
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return round(value) if self.integer else value


class SweepSpec(BaseModel):
    """What a sweep runs, varies, compares and how many at once."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # A folder, a W&B group and part of a Prefect artifact key (lowercase, digits, dashes).
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    deployment: str = Field("train-flow/ddpm-cifar10", pattern=r"^[^/]+/[^/]+$")
    metric: Literal["epoch/loss", "eval/fid", "eval/kid"] = "epoch/loss"
    goal: Literal["minimize", "maximize"] = "minimize"
    search: Literal["grid", "random", "tpe"] = "grid"
    trials: int | None = Field(None, ge=1, le=10_000)
    concurrency: int = Field(1, ge=1, le=256)
    seed: int = Field(0, ge=0, lt=2**63)
    base: dict[str, Any] = Field(default_factory=dict)
    vary: dict[str, list[Any] | Range] = Field(min_length=1)
    # The password of a database on a server comes from PGPASSWORD or ~/.pgpass, never from
    # the spec: every trial's settings (and so its files, parameters and W&B config) hold it.
    storage: Annotated[str | None, AfterValidator(no_password(PGPASSWORD_INSTEAD))] = Field(
        None, pattern=r"^(sqlite|postgresql|mysql)[+a-z0-9]*://"
    )
    startup_trials: int = Field(4, ge=0, le=10_000)
    warmup_epochs: int = Field(1, ge=0)
    prune: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        ranges = [key for key, how in self.vary.items() if isinstance(how, Range)]
        if self.search == "grid" and ranges:
            raise ValueError(f"vary.{ranges[0]}: a range needs search random or tpe")
        if self.search == "grid" and self.trials is not None:
            raise ValueError("trials: a grid runs every combination; leave trials out")
        if self.search != "grid" and self.trials is None:
            raise ValueError(f"trials: required for search {self.search}")
        empty = [key for key, how in self.vary.items() if isinstance(how, list) and not how]
        if empty:
            raise ValueError(f"vary.{empty[0]}: no choices")
        if self.search != "tpe" and self.storage is not None:
            raise ValueError("storage: only a tpe search keeps an Optuna study")
        if self.draws_samples:
            self._a_scoring_spec()
        return self

    @property
    def draws_samples(self) -> bool:
        """Whether the trials are sample-flow runs scoring trained runs (no training)."""
        return self.deployment.partition("/")[0] == SAMPLE_FLOW

    @property
    def settings_base(self) -> dict[str, Any]:
        """The settings in base (a sample-flow spec's base also holds sample_flow options)."""
        options = sample_options() if self.draws_samples else []
        return {key: value for key, value in self.base.items() if key not in options}

    def _a_scoring_spec(self) -> None:
        if not self.metric.startswith("eval/"):
            raise ValueError(f"metric: {self.deployment} trials score images: eval/fid or eval/kid")
        if self.search == "tpe":
            raise ValueError("search: tpe prunes trials by their epochs; a sample-flow trial "
                             "has none (grid or random)")  # fmt: skip
        options = sample_options()
        for where, keys in (("base", self.base), ("vary", self.vary)):
            for key in keys:
                if key in SAMPLE_TRIAL_SETS:
                    raise ValueError(f"{where}.{key}: the sweep sets it for each trial (images "
                                     "in runs/sweeps/<name>/trial-<i>, scored)")  # fmt: skip
                if key not in options and not key.startswith(SAMPLE_TRIAL_SETTINGS):
                    raise ValueError(
                        f"{where}.{key}: not for a {self.deployment} trial, which takes the "
                        f"options {', '.join(options)} and the "
                        f"{', '.join(p + '*' for p in SAMPLE_TRIAL_SETTINGS)} settings"
                    )
        if "run" not in self.base and "run" not in self.vary:
            raise ValueError("run: the trained run (or runs) the trials draw from")


def read_spec(path: Path | str) -> SweepSpec:
    """The spec in a YAML file, checked (spec_from).

    Raises:
        SpecError: naming the file and what is wrong (a key, a setting, a value).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_bytes().decode()) or {}
    except FileNotFoundError:
        raise SpecError(f"{path}: no such sweep spec") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: a folder, not a sweep spec (a YAML file)") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot be read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text, so not a YAML sweep spec") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, Mapping):
        raise SpecError(f"{path}: a sweep spec is a mapping of keys (name, vary, ...)")
    return spec_from(data, str(path))


def spec_from(source: Path | str | Mapping[str, Any], where: str = "spec") -> SweepSpec:
    """The spec in a mapping (a deployment's parameter; `where` names it in errors) or in a
    YAML file (a path), with every trial's settings checked (check_trials).

    Raises:
        SpecError: naming `where` (or the file) and what is wrong.
    """
    if not isinstance(source, Mapping):
        return read_spec(source)
    names = [key for key in source if not isinstance(key, str)]
    if names:
        raise SpecError(f"{where}: {names[0]!r}: a key of a spec is a name (name, vary, ...)")
    try:
        spec = SweepSpec(**source)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise SpecError(one_line(f"{where}: {key + ': ' if key else ''}{message}")) from None
    check_trials(spec, where)
    return spec


def check_trials(spec: SweepSpec, where: str) -> None:
    """Validate every planned trial's settings (tpe: the base with each list's first choice
    and each range's low end), and that the trials produce the spec's metric.

    Raises:
        SpecError: naming `where` and the trial's values.
    """
    first = {key: how.low if isinstance(how, Range) else how[0] for key, how in spec.vary.items()}
    for index, values in enumerate(planned(spec) or [first]):  # tpe plans as it goes: one
        settings = {**spec.base, **values}
        if spec.draws_samples:
            options, settings = sample_trial(spec, index, values)
            try:
                generate_options(options)
            except OptionsError as err:
                raise SpecError(f"{where}: a trial's options {values} are invalid: {err}") from None
        try:
            cfg = load_settings(settings, env_file=None)
        except SettingsError as err:
            raise SpecError(f"{where}: a trial's settings {values} are invalid: {err}") from None
        if spec.draws_samples:
            if spec.metric.removeprefix("eval/") not in cfg.eval.metrics:
                raise SpecError(f"{where}: metric: {spec.metric} is not in eval.metrics "
                                f"({','.join(cfg.eval.metrics)})")  # fmt: skip
            continue
        evaluated = spec.metric.removeprefix("eval/")
        evaluates = cfg.eval.every and evaluated in cfg.eval.metrics
        if spec.metric.startswith("eval/") and not evaluates:
            raise SpecError(
                f"{where}: metric: {spec.metric} needs trials that evaluate {evaluated} "
                f"(set eval.every and eval.metrics in base); trial {values} does not"
            )


def planned(spec: SweepSpec) -> list[dict[str, Any]]:
    """The varied settings of each trial, in order: every combination of a grid (the first
    key varying slowest), or spec.trials draws seeded by spec.seed (random). A tpe search
    plans as it goes (Optuna), so it has no plan: []."""
    if spec.search == "grid":
        keys = list(spec.vary)
        return [dict(zip(keys, combo, strict=True))
                for combo in itertools.product(*(spec.vary[k] for k in keys))]  # fmt: skip
    if spec.search == "tpe":
        return []
    rng = random.Random(spec.seed)
    return [
        {key: how.draw(rng) if isinstance(how, Range) else rng.choice(how)
         for key, how in spec.vary.items()}
        for _ in range(spec.trials or 0)
    ]  # fmt: skip


def trial_overrides(spec: SweepSpec, index: int, values: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's overrides: the base, its values, and its place: run.dir runs/sweeps/<name>,
    run.name trial-<index> (so a re-run of the sweep finds, resumes or skips it)."""
    return {
        **spec.base,
        **values,
        "run.dir": str(Path(spec.base.get("run.dir", "runs")) / "sweeps" / spec.name),
        "run.name": f"trial-{index:03d}",
    }


def sample_trial(
    spec: SweepSpec, index: int, values: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A sample-flow trial's options and settings (its flow run's parameters options and
    overrides): the base and its values, its images drawn into runs/sweeps/<name>/trial-<index>
    and scored."""
    merged, options = {**spec.base, **values}, sample_options()
    folder = Path(trial_overrides(spec, index, values)["run.dir"]) / f"trial-{index:03d}"
    chosen = {key: value for key, value in merged.items() if key in options}
    settings = {key: value for key, value in merged.items() if key not in options}
    return {**chosen, "out": str(folder), "evaluate": True}, settings
