"""A sweep's trial reports its metric to the sweep's Optuna study after each epoch, and stops
early when the study's median pruner says so (flows.sweep.schedule sets sweep.* for its
trials).

The study lives in a database every worker reaches (sweep.storage), so trials on several
machines compare against each other. The trial creates its own Optuna trial there with
`study.ask`, holding the values the sweep's TPE sampler chose for it (handed over in the
study's user attributes, with the pruning rules: metric, startup trials, warm-up epochs; see
flows.sweep.study), and names its sweep trial in the trial's user attributes. A trial that
resumes (started again after a crash, or by a re-run of the sweep) does so in a new Optuna
trial: it reports the epochs it had done again, and its earlier Optuna trial fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flows.sweep.study import TRIAL_ATTR, values_attr
from settings import Settings


def _given(values: Mapping[str, Any]) -> Any:
    """An Optuna sampler that draws the given values (the sweep's TPE sampler chose them)."""
    from optuna.samplers import BaseSampler

    class Given(BaseSampler):  # Optuna's documented way to define a sampler
        def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
            return {}

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
            return {}

        def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
            return values[name]

    return Given()


class TrialReport:
    """The run's Optuna trial; `pruned(...)` reports an epoch and says whether to stop.

    Args:
        rows: the epochs done before this process started (flows.tracking.RunArtifacts.rows),
            reported again to the new Optuna trial of a resumed run.
    """

    def __init__(self, cfg: Settings, rows: Sequence[Mapping[str, Any]] = ()) -> None:
        import optuna
        from optuna.distributions import json_to_distribution
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        where = cfg.sweep
        storage = optuna.storages.RDBStorage(where.storage)
        rules = optuna.load_study(study_name=where.study, storage=storage).user_attrs
        self.metric: str = rules["metric"]
        self.prune: bool = rules["prune"]
        self.study = where.study
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=rules["startup_trials"],
            n_warmup_steps=rules["warmup_epochs"] + 1,  # epochs count from 1
        )
        study = optuna.load_study(study_name=where.study, storage=storage, pruner=pruner,
                                  sampler=_given(rules[values_attr(where.trial)]))  # fmt: skip
        space = {k: json_to_distribution(v) for k, v in rules["distributions"].items()}
        self.trial = study.ask(space)
        self.trial.set_user_attr(TRIAL_ATTR, where.trial)
        for old in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if old.user_attrs.get(TRIAL_ATTR) == where.trial and old.number != self.trial.number:
                study.tell(old.number, state=TrialState.FAIL)  # its process is gone: this resumes
        for row in rows:
            if (value := self._value(row.get("loss"), row)) is not None:
                self.trial.report(value, row["epoch"])

    @classmethod
    def of(cls, cfg: Settings, rows: Sequence[Mapping[str, Any]] = ()) -> TrialReport | None:
        """The run's report when a sweep runs it as a pruned trial, else None."""
        return cls(cfg, rows) if cfg.sweep.study is not None else None

    def _value(self, loss: float | None, evaluation: Mapping[str, Any] | None) -> float | None:
        if self.metric == "epoch/loss":
            return loss
        return (evaluation or {}).get(self.metric.removeprefix("eval/"))

    def pruned(self, epoch: int, loss: float, evaluation: dict[str, Any] | None) -> str | None:
        """Report this epoch's metric (when it has one); returns why the trial stops, or None
        to go on."""
        value = self._value(loss, evaluation)
        if value is None:
            return None
        self.trial.report(value, epoch)
        if self.prune and self.trial.should_prune():
            return (
                f"pruned by sweep {self.study}'s median pruner after epoch {epoch} "
                f"({self.metric} {value:.4g} is worse than the median of earlier trials)"
            )
        return None
