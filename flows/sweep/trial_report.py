"""A sweep's trial reports its metric to the sweep's Optuna study after each epoch, and stops
early when the study's median pruner says so (flows.sweep_flow sets sweep.* for its trials).

The study lives in a database every worker reaches (sweep.storage), so trials on several
machines compare against each other; the sweep records the pruning rules (metric, startup
trials, warm-up epochs) in the study's user attributes when it creates it.
"""

from __future__ import annotations

from typing import Any

from settings import Settings


class TrialReport:
    """The run's Optuna trial; `pruned(...)` reports an epoch and says whether to stop."""

    def __init__(self, cfg: Settings) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        where = cfg.sweep
        storage = optuna.storages.RDBStorage(where.storage)
        study_id = storage.get_study_id_from_name(where.study)
        rules = storage.get_study_user_attrs(study_id)
        self.metric: str = rules["metric"]
        self.prune: bool = rules["prune"]
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=rules["startup_trials"],
            n_warmup_steps=rules["warmup_epochs"] + 1,  # epochs count from 1
        )
        study = optuna.load_study(study_name=where.study, storage=storage, pruner=pruner)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, where.trial)
        self.trial = optuna.trial.Trial(study, trial_id)
        self.study = where.study

    @classmethod
    def of(cls, cfg: Settings) -> TrialReport | None:
        """The run's report when a sweep runs it as a pruned trial, else None."""
        return cls(cfg) if cfg.sweep.study is not None else None

    def pruned(self, epoch: int, loss: float, evaluation: dict[str, Any] | None) -> str | None:
        """Report this epoch's metric (when it has one); returns why the trial stops, or None
        to go on."""
        if self.metric == "epoch/loss":
            value = loss
        else:
            value = (evaluation or {}).get(self.metric.removeprefix("eval/"))
        if value is None:
            return None
        self.trial.report(value, epoch)
        if self.prune and self.trial.should_prune():
            return (
                f"pruned by sweep {self.study}'s median pruner after epoch {epoch} "
                f"({self.metric} {value:.4g} is worse than the median of earlier trials)"
            )
        return None
