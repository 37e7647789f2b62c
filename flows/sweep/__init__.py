"""The parts of a sweep (flows.sweep_flow defines the flow itself), one job to a module:

- schedule: start trials through run_deployment up to the concurrency, watch them, record each
  as it ends, stop on request;
- trial_result: a trial's outcome, read from its flow run and its artifacts;
- record: the sweep's folder and its record (sweep.json), which a re-run continues from;
- report: the table, the metric plot and the sweep's W&B run;
- study: the tpe search's Optuna study, as the sweep uses it: each trial's values from the
  seeded TPE sampler, handed to the trial, and how the trial ended, told;
- trial_report: a trial's side of that study, in the trial's own process (train_flow): its own
  Optuna trial, its metric reported every epoch, the median pruner's verdict.
"""
