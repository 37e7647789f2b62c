"""The tpe search's Optuna study: created in the sweep's database (spec `storage`, default a
SQLite file in the sweep's folder) or loaded to continue it, asked through Optuna's TPE
sampler (seeded; constant_liar, so that trials running at once are spread out), with the rules
its trials prune by in its user attributes (flows.sweep.trial_report reads them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from settings.sweep import Range, SweepSpec


def open_study(spec: SweepSpec, folder: Path) -> tuple[Any, str]:
    """The tpe search's Optuna study (created, or loaded to continue), with the rules its
    trials prune by in its user attributes, and its database URL."""
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


def distributions(spec: SweepSpec) -> dict[str, Any]:
    """The spec's `vary` as Optuna distributions, by setting: a list is categorical, a range
    a float or an integer one (log-scaled where it says so)."""
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
