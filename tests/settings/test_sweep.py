"""The sweep spec (issue 28): read from YAML, every trial's settings checked before any runs,
and the trials of grid and random searches."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.commands import SWEEP_EXAMPLE, sweep_parser
from settings import SettingsError, load_settings, run_name
from settings.sweep import (
    SpecError,
    planned,
    read_spec,
    sample_trial,
    spec_from,
    trial_overrides,
)

REPO = Path(__file__).resolve().parents[2]

SPEC = """
name: lr-width
deployment: train-flow/ddpm-smoke
metric: epoch/loss
goal: minimize
search: grid
concurrency: 4
seed: 0
base: {train.epochs: 2}
vary:
  optim.lr: [1.0e-4, 2.0e-4]
  model.hidden_size: [16, 32]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_the_issue_example_plans_every_combination_in_order(tmp_path: Path) -> None:
    """The issue's grid: 4 trials, the first key varying slowest; each trial gets the base,
    its values, and a folder of its own under runs/sweeps/<name>."""
    spec = read_spec(write(tmp_path, SPEC))
    assert (spec.name, spec.concurrency) == ("lr-width", 4)
    assert spec.deployment == "train-flow/ddpm-smoke"
    assert planned(spec) == [
        {"optim.lr": 1e-4, "model.hidden_size": 16},
        {"optim.lr": 1e-4, "model.hidden_size": 32},
        {"optim.lr": 2e-4, "model.hidden_size": 16},
        {"optim.lr": 2e-4, "model.hidden_size": 32},
    ]
    assert trial_overrides(spec, 2, planned(spec)[2]) == {
        "train.epochs": 2, "optim.lr": 2e-4, "model.hidden_size": 16,
        "run.dir": str(Path("runs") / "sweeps" / "lr-width"), "run.name": "trial-002",
    }  # fmt: skip


def test_random_trials_are_seeded_and_stay_in_their_ranges(tmp_path: Path) -> None:
    """random: `trials` draws, the same for the same seed, other for another; a log range
    draws log-uniformly inside it, a list draws only its choices."""
    text = SPEC.replace("search: grid", "search: random\ntrials: 40").replace(
        "model.hidden_size: [16, 32]", "train.ema_decay: {low: 0.99, high: 0.9999, log: true}"
    )
    spec = read_spec(write(tmp_path, text))
    trials = planned(spec)
    assert len(trials) == 40 and trials == planned(spec)
    assert trials != planned(spec.model_copy(update={"seed": 1}))
    decays = [t["train.ema_decay"] for t in trials]
    assert all(0.99 <= d <= 0.9999 for d in decays)
    logs = [math.log(d) for d in decays]  # log-uniform: about half below the log midpoint
    middle = (math.log(0.99) + math.log(0.9999)) / 2
    assert 10 <= sum(x < middle for x in logs) <= 30
    assert {t["optim.lr"] for t in trials} == {1e-4, 2e-4}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("search: grid", "search: random"), "trials: required for search random"),
        (("[16, 32]", "{low: 16, high: 64}"), "vary.model.hidden_size: a range needs search"),
        (("model.hidden_size", "model.hidden_sise"), "model.hidden_sise"),
        (("[1.0e-4, 2.0e-4]", "[1.0e-4, -1]"), "optim.lr"),
        (("concurrency: 4", "concurrency: 0"), "concurrency"),
        (("goal: minimize", "goal: lowest"), "goal"),
        (("name: lr-width", "name: a/b"), "name"),
        (("seed: 0", "seed: 0\nbogus: 1"), "bogus: Extra inputs are not permitted"),
        (("name: lr-width", "name: LR_width"), "name: String should match pattern"),
        (("metric: epoch/loss", "metric: eval/fid"), "metric: eval/fid needs trials that evaluate"),
        (("seed: 0", "seed: 0\nstorage: sqlite:///s.db"), "storage: only a tpe search"),
        (("search: grid", "search: tpe"), "trials: required for search tpe"),
        (("search: grid", "search: tpe\ntrials: 4\nstorage: s.db"), "storage: String should"),
    ],
)
def test_a_bad_spec_is_one_error_naming_the_file_and_the_key(
    change: tuple[str, str], named: str, tmp_path: Path
) -> None:
    """Every trial's settings are validated before the sweep starts: a bad key, value or
    search is an error naming the spec file and the key."""
    path = write(tmp_path, SPEC.replace(*change))
    with pytest.raises(SpecError) as err:
        read_spec(path)
    assert str(path) in str(err.value) and named in str(err.value), str(err.value)


def test_missing_or_unreadable_spec_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such sweep spec"):
        read_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="not YAML"):
        read_spec(write(tmp_path, "name: [unclosed"))
    with pytest.raises(SpecError, match="a sweep spec is a mapping"):
        read_spec(write(tmp_path, "- name: x"))


def test_a_spec_given_as_a_mapping_is_checked_alike() -> None:
    """A deployment passes the spec itself: the same checks, errors naming `spec`."""
    spec = spec_from({"name": "m", "vary": {"optim.lr": [1e-3]}})
    assert spec.deployment == "train-flow/ddpm-cifar10" and spec.search == "grid"
    with pytest.raises(SpecError, match=r"^spec: vary: Field required"):
        spec_from({"name": "m"})
    with pytest.raises(SpecError, match=r"(?s)^spec: a trial.s settings .* optim.lr"):
        spec_from({"name": "m", "vary": {"optim.lr": [0]}})


@pytest.mark.parametrize("name", ["lr-width.yaml", "lr-ema-tpe.yaml"])
def test_the_example_specs_are_valid(name: str) -> None:
    """The specs the README runs (deployments/sweeps/) pass every check."""
    spec = read_spec(REPO / "deployments" / "sweeps" / name)
    assert spec.deployment == "train-flow/ddpm-smoke"


def test_the_example_in_ddpm_sweep_help_is_the_lr_width_spec() -> None:
    """`ddpm-sweep --help` shows a spec that passes every check and is deployments/sweeps/
    lr-width.yaml's, so the two cannot drift apart; the help points to the folder."""
    shown = spec_from(yaml.safe_load(SWEEP_EXAMPLE))
    assert shown == read_spec(REPO / "deployments" / "sweeps" / "lr-width.yaml")
    help_text = sweep_parser().format_help()
    assert SWEEP_EXAMPLE.splitlines()[-1] in help_text and "deployments/sweeps/" in help_text


def test_the_ema_length_example_scores_a_run_folder(tmp_path: Path) -> None:
    """deployments/sweeps/ema-length.yaml, its run set to a folder: sample-flow trials, each
    a sigma_rel, drawing into the sweep's folder, scored, the spec's other keys as options."""
    text = (REPO / "deployments" / "sweeps" / "ema-length.yaml").read_text()
    (tmp_path / "runs" / "r").mkdir(parents=True)
    spec = spec_from({**yaml.safe_load(text.replace("runs/RUN", "runs/r"))})
    assert spec.draws_samples and spec.settings_base == {}
    options, settings = sample_trial(spec, 2, planned(spec)[2])
    assert options == {"run": "runs/r", "num": 10000, "sigma_rel": 0.1, "evaluate": True,
                       "out": str(Path("runs/sweeps/ema-length/trial-002"))}  # fmt: skip
    assert settings == {}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"metric": "epoch/loss"}, r"^spec: metric: sample-flow/ddpm-sample trials score images"),
        ({"search": "tpe", "trials": 2}, r"^spec: search: tpe prunes trials by their epochs"),
        ({"base": {"run": "r", "num": 4, "train.epochs": 3}}, r"^spec: base.train.epochs: not "),
        ({"base": {"run": "r", "num": 4, "out": "mine"}}, r"^spec: base.out: the sweep sets it"),
        ({"base": {"num": 4}}, r"^spec: run: the trained run"),
        ({"base": {"run": "gone", "num": 4}}, r"^spec: a trial's options .* --run: no such run"),
        ({"base": {"run": "r", "num": 0}}, r"^spec: a trial's options .* --num: "),
        ({"base": {"run": "r", "num": 4, "eval.metrics": "kid"}}, r"eval/fid is not in eval"),
        ({"vary": {"sigma_rel": [0.5]}}, r"^spec: a trial's options .* --sigma-rel"),
        ({"vary": {"eval.batch_size": [0]}}, r"^spec: a trial's settings .* eval.batch_size"),
    ],
)
def test_a_bad_scoring_spec_names_the_key(
    tmp_path: Path, change: dict[str, Any], named: str
) -> None:
    """A sample-flow spec is checked as a whole before anything runs: a metric its trials do
    not give, tpe (nothing to prune by), a training setting, a key the sweep sets, no run, a
    run that is not there, and a bad option or setting value each name the key."""
    (tmp_path / "r").mkdir()
    spec = {"name": "s", "deployment": "sample-flow/ddpm-sample", "metric": "eval/fid",
            "base": {"run": "r", "num": 4}, "vary": {"sigma_rel": [0.05, 0.1]},
            **change}  # fmt: skip
    with pytest.raises(SpecError, match=named):
        spec_from(spec)


def test_a_trials_sweep_settings_go_together_and_name_no_run() -> None:
    """sweep.* (set by a tpe sweep for its trials) and wandb.group change neither the run's
    name nor what it computes; sweep.storage without the rest is refused, naming sweep.trial."""
    where = {"sweep.storage": "sqlite:///s.db", "sweep.study": "s", "sweep.trial": 3}
    plain = load_settings({}, env_file=None)
    trial = load_settings({**where, "wandb.group": "s"}, env_file=None)
    assert run_name(trial) == run_name(plain) and trial.sweep.trial == 3
    with pytest.raises(SettingsError, match=r"sweep\.trial .* go together"):
        load_settings({"sweep.storage": "sqlite:///s.db"}, env_file=None)
