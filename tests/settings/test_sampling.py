"""sample_flow's options and the settings it works with: flags named in errors, the run's own
settings kept, the command's eval settings from env and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from settings import SettingsError, load_settings
from settings.sampling import GenerateOptions, OptionsError, generate_options, sampling_settings


def test_bad_options_are_named_by_their_flags() -> None:
    """Each bad value is reported under its command-line flag, all at once."""
    with pytest.raises(OptionsError) as err:
        generate_options({"run": "r", "num": 0, "out": "o", "batch_size": 0, "eta": 2})
    for flag in ("--num", "--batch-size", "--eta"):
        assert flag in str(err.value)
    with pytest.raises(OptionsError, match="--out: Field required"):
        generate_options({"run": "r", "num": 1})


def test_the_runs_settings_win_and_eval_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run's saved model settings are kept whatever the environment says; eval.* comes from
    the environment and overrides; the options set the sampler, device and precision, and
    unset sampler options keep the run's."""
    saved = load_settings({"model.hidden_size": 32, "sample.steps": 40}).model_dump(mode="json")
    monkeypatch.setenv("DDPM_MODEL__HIDDEN_SIZE", "64")
    monkeypatch.setenv("DDPM_EVAL__BATCH_SIZE", "16")
    Path("r").mkdir()  # a run folder (--run must name one that exists)
    options = GenerateOptions(run=Path("r"), num=4, out=Path("o"), eta=0.5, device="cpu")
    cfg = sampling_settings(saved, options, {"eval.metrics": ["kid"]})
    assert cfg.model.hidden_size == 32
    assert (cfg.eval.batch_size, cfg.eval.metrics) == (16, ["kid"])
    assert (cfg.sample.steps, cfg.sample.eta, cfg.train.device) == (40, 0.5, "cpu")


def test_steps_past_the_runs_timesteps_are_refused() -> None:
    """--steps above the run's diffusion.num_timesteps is an error naming sample.steps."""
    saved = load_settings({"diffusion.num_timesteps": 50, "sample.steps": 10})
    saved = saved.model_dump(mode="json")
    Path("r").mkdir()  # a run folder (--run must name one that exists)
    options = GenerateOptions(run=Path("r"), num=4, out=Path("o"), steps=100)
    with pytest.raises(SettingsError, match=r"sample\.steps"):
        sampling_settings(saved, options)


def test_a_missing_weights_file_is_named() -> None:
    """eval.weights naming no file fails before anything runs, naming the setting."""
    with pytest.raises(SettingsError, match=r"eval\.weights.*no such file"):
        load_settings({"eval.weights": "nowhere/inception.pth"})


def test_an_ema_length_needs_a_run_folder_and_the_ema() -> None:
    """--sigma-rel rebuilds from a run folder's snapshots: a checkpoint file, --no-ema, or a
    length outside (0, sqrt(1/12)) is one error naming --sigma-rel; a run folder is taken."""
    Path("r").mkdir()
    Path("best.pt").write_bytes(b"")
    cases = [
        ({"run": "best.pt", "sigma_rel": 0.1}, "best.pt is a file"),
        ({"run": "r", "sigma_rel": 0.1, "ema": False}, "not with --no-ema"),
        ({"run": "r", "sigma_rel": 0.3}, "Input should be less than 0.288"),
    ]
    for values, said in cases:
        with pytest.raises(OptionsError, match=r"^invalid option --sigma-rel: .*" + said):
            generate_options({"num": 1, "out": "o", **values})
    assert generate_options({"run": "r", "num": 1, "out": "o", "sigma_rel": 0.1}).sigma_rel == 0.1
