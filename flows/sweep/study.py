"""The tpe search's Optuna study, through Optuna's public interface (ask and tell).

The study lives in a database every worker reaches (spec `storage`, default a SQLite file in
the sweep's folder). The sweep chooses each trial's values with Optuna's TPE sampler (seeded;
constant_liar, so that trials running at once are spread out); the trial's own process creates
its Optuna trial with those values, reports its metric to it every epoch and asks the median
pruner whether to stop (flows.sweep.trial_report), for Optuna has no public way to report to a
trial that another process asked for. So the sweep asks a copy of the study in memory that
also holds, as running, the started trials whose process has not created theirs yet, in the
sweep's order: the sampler sees what it would see had the sweep asked the study itself, and
asks the same values (tests/flows/test_sweep_flow.py compares the two). The values reach the
trial in the study's user attributes, with the rules its trials prune by; each Optuna trial
names its sweep trial in a user attribute, by which the sweep tells it how the trial ended.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.sweep.record import FINISHED, Trial
from settings.sweep import Range, SweepSpec

TRIAL_ATTR = "sweep_trial"  # an Optuna trial's user attribute: its sweep trial's index


def values_attr(index: int) -> str:
    """The study's user attribute that hands trial `index`'s values to its process."""
    return f"trial-{index:03d}"


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


class SweepStudy:
    """The tpe search's study (created, or loaded to continue), as the sweep uses it: ask a
    trial's values, hand them to its process, tell the study how the trial ended.

    Attributes:
        study: the optuna.Study; storage: its database URL; space: the spec's distributions;
        sampler: the seeded TPE sampler that asks every trial's values.
    """

    def __init__(self, spec: SweepSpec, folder: Path) -> None:
        import optuna
        from optuna.distributions import distribution_to_json

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        folder.mkdir(parents=True, exist_ok=True)
        self.storage = spec.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
        self.space = distributions(spec)
        self.sampler = optuna.samplers.TPESampler(
            seed=spec.seed, n_startup_trials=spec.startup_trials, constant_liar=True
        )
        self.study = optuna.create_study(
            study_name=spec.name,
            storage=self.storage,
            direction=spec.goal,
            sampler=self.sampler,
            load_if_exists=True,
        )
        space = {key: distribution_to_json(how) for key, how in self.space.items()}
        rules = {"metric": spec.metric, "prune": spec.prune, "startup_trials": spec.startup_trials,
                 "warmup_epochs": spec.warmup_epochs, "distributions": space}  # fmt: skip
        for key, value in rules.items():
            self.study.set_user_attr(key, value)

    def ask(self, started: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
        """The next trial's values, from the TPE sampler; `started`: the values of the trials
        running now, by index (those whose process has not created their Optuna trial yet
        count as running, as constant_liar would count them)."""
        import optuna
        from optuna.trial import TrialState, create_trial

        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        trials = self.study.get_trials(deepcopy=False, states=states)
        present = {t.user_attrs.get(TRIAL_ATTR) for t in trials if t.state == TrialState.RUNNING}
        # A study from before the attribute: its trial numbers were the sweep's indices.
        ordered = [(t.user_attrs.get(TRIAL_ATTR, t.number), t.number, t) for t in trials]
        ordered += [(index, -1, create_trial(state=TrialState.RUNNING, params=dict(values),
                                             distributions=self.space))
                    for index, values in started.items() if index not in present]  # fmt: skip
        ordered.sort(key=lambda item: item[:2])  # the sampler's draws follow the trials' order
        copy = optuna.create_study(direction=self.study.direction, sampler=self.sampler)
        copy.add_trials([trial for *_, trial in ordered])
        return dict(copy.ask(self.space).params)

    def hand_over(self, trial: Trial) -> None:
        """Give a trial's values to its process, before it starts; an Optuna trial of it from
        before the attribute existed, still running, fails (the trial starts again in a new
        one; a trial's process fails its own earlier ones)."""
        from optuna.trial import TrialState

        self.study.set_user_attr(values_attr(trial.index), trial.values)
        for old in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if old.number == trial.number and TRIAL_ATTR not in old.user_attrs:
                self.study.tell(old.number, state=TrialState.FAIL)

    def number(self, trial: Trial) -> int | None:
        """The number of the trial's Optuna trial (its newest: a trial started again runs in
        a new one), or its recorded one (a study from before the attribute)."""
        found = [t.number for t in self.study.get_trials(deepcopy=False)
                 if t.user_attrs.get(TRIAL_ATTR) == trial.index]  # fmt: skip
        return max(found, default=trial.number)

    def tell(self, trial: Trial) -> None:
        """Tell the study how a finished trial ended; the Optuna trial of one that failed,
        crashed or was cancelled stays running (constant_liar counts it) until the trial runs
        again, in a new one (a re-run of the sweep runs it again)."""
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
