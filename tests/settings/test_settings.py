"""Tests for `settings`: defaults, env / `.env` / flags / overrides and their precedence, errors
that name the field (with its env variable and flag), `--help`, and a property-based check that
any single setting either loads into a valid `Settings` or fails with a `SettingsError`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from settings import (
    Settings,
    SettingsError,
    core_config,
    env_name,
    flag_name,
    flatten,
    load_settings,
    nest,
    parse_flags,
    result_changes,
    run_name,
    setting_name,
)


@pytest.fixture(autouse=True)
def _image_folders(tmp_path: Path) -> None:
    """The image folders the tests' data.folder values name, in the test's working folder:
    data.folder must name a folder that exists."""
    for name in ("imgs", "pics", "images"):
        (tmp_path / name).mkdir()


# Every dotted setting with its default, built without reading the environment or a `.env`.
DEFAULTS: dict[str, Any] = flatten(Settings.model_construct().model_dump())
FIELDS = sorted(DEFAULTS)

# For each setting, a valid value other than its default (JSON form) and the other settings it
# needs to be valid (e.g. a folder dataset for a non-CIFAR image size).
FOLDER = {"data.dataset": "folder", "data.folder": "imgs"}
NON_DEFAULT: dict[str, tuple[Any, dict[str, Any]]] = {
    "data.dataset": ("folder", {"data.folder": "imgs"}),
    "data.root": ("datasets/cifar", {}),
    "data.folder": ("imgs", {"data.dataset": "folder"}),
    "data.url": ("https://mirror.example/cifar-10-python.tar.gz", {}),
    "data.image_size": (64, FOLDER),
    "data.subset": (500, {}),
    "data.random_flip": (False, {}),
    "data.num_workers": (4, {}),
    "data.loader": ("dataloader", {}),
    "data.prepare": ("off", {}),
    "model.hidden_size": (64, {}),
    "model.channels": (1, FOLDER),
    "model.arch": ("ddpm", {}),
    "model.channel_mult": ([1, 2], {}),
    "model.num_res_blocks": (1, {}),
    "model.attention_resolutions": ([8], {}),
    "model.dropout": (0.2, {}),
    "model.checkpointing": (True, {"model.arch": "ddpm"}),
    "model.augment_labels": (True, {}),
    "model.init_from": (".", {}),  # a folder that exists (the test's own)
    "diffusion.num_timesteps": (2000, {}),
    "diffusion.beta_start": (0.001, {}),
    "diffusion.beta_end": (0.05, {}),
    "diffusion.schedule": ("linear", {}),
    "diffusion.prediction": ("x0", {}),
    "diffusion.loss_weighting": ("min_snr", {}),
    "diffusion.min_snr_gamma": (1.0, {}),
    "diffusion.formulation": ("edm", {}),
    "diffusion.sigma_data": (0.5, {}),
    "diffusion.p_mean": (-1.0, {}),
    "diffusion.p_std": (1.0, {}),
    "optim.name": ("sgd", {}),
    "optim.lr": (0.0003, {}),
    "optim.momentum": (0.5, {}),
    "optim.weight_decay": (0.01, {}),
    "optim.warmup_steps": (0, {}),
    "optim.schedule": ("cosine", {}),
    "optim.grad_clip": (0.5, {}),
    "train.epochs": (3, {}),
    "train.batch_size": (16, {}),
    "train.seed": (42, {}),
    "train.device": ("cuda:1", {}),
    "train.ema_decay": (0.999, {}),
    "train.ema_snapshots": (16, {}),
    "train.log_every": (10, {}),
    "train.max_bad_steps": (3, {}),
    "train.precision": ("bf16", {}),
    "train.compile": ("off", {}),
    "train.deterministic": (True, {}),
    "train.devices": (4, {}),
    "train.rank_timeout": (30.0, {}),
    "train.max_restarts": (0, {}),
    "train.accumulate": (4, {}),
    "sample.every": (0, {}),
    "sample.num": (16, {}),
    "sample.sampler": ("ddpm", {}),
    "sample.steps": (40, {}),
    "sample.eta": (0.5, {}),
    "sample.use_ema": (False, {}),
    "sample.clip_denoised": (False, {}),
    "sample.compile": ("on", {}),
    "sample.rho": (5.0, {}),
    "sample.sigma_min": (0.01, {"sample.sampler": "heun"}),
    "sample.sigma_max": (70.0, {"sample.sampler": "heun"}),
    "sample.s_churn": (10.0, {"sample.sampler": "heun"}),
    "sample.s_tmin": (0.05, {}),
    "sample.s_tmax": (50.0, {}),
    "sample.s_noise": (1.003, {}),
    "eval.every": (5, {}),
    "eval.num_samples": (10_000, {}),
    "eval.metrics": (["fid"], {}),
    "eval.weights": (str(Path(__file__).resolve()), {}),  # any existing file
    "eval.batch_size": (64, {}),
    "eval.cache_dir": ("stats", {}),
    "run.name": ("cifar-run_1.b", {}),
    "run.dir": ("out/runs", {}),
    "run.keep": (5, {}),
    "run.checkpoint_every": (1000, {}),
    "run.stop_timeout": (10.0, {}),
    "run.server_timeout": (300.0, {}),
    "run.debug": (True, {}),
    "wandb.mode": ("offline", {}),
    "wandb.project": ("ddpm-cifar", {}),
    "wandb.entity": ("my-team", {}),
    "wandb.group": ("lr-width", {}),
    "sweep.storage": ("sqlite:///study.db", {"sweep.study": "s", "sweep.trial": 0}),
    "sweep.study": ("lr-width", {"sweep.storage": "sqlite:///s.db", "sweep.trial": 0}),
    "sweep.trial": (3, {"sweep.storage": "sqlite:///s.db", "sweep.study": "s"}),
}


def _as_text(value: Any) -> str:
    """How a value is written in an env var, a `.env` line or a flag (lists as JSON)."""
    if isinstance(value, list):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _json(settings: Settings) -> dict[str, Any]:
    return flatten(settings.model_dump(mode="json"))


def _names_field(err: SettingsError, field: str) -> None:
    assert field in err.fields, f"{field} not in {err.fields}: {err}"
    assert env_name(field) in str(err), str(err)
    assert flag_name(field) in str(err), str(err)


# Defaults


def test_defaults_are_the_papers_where_the_paper_gives_them() -> None:
    """With no env, no `.env` and no overrides, the settings the DDPM paper fixes for CIFAR-10
    have its values (every default is listed, from the code, in the settings reference:
    tests/settings/test_reference.py)."""
    s = load_settings(env_file=None)
    paper = {"diffusion.num_timesteps": 1000, "optim.lr": 2e-4, "optim.warmup_steps": 5000,
             "train.batch_size": 128, "train.ema_decay": 0.9999, "model.dropout": 0.1,
             "data.random_flip": True, "eval.num_samples": 50_000}  # fmt: skip
    assert {k: _json(s)[k] for k in paper} == paper
    assert isinstance(s.data.root, Path)
    assert isinstance(s.run.dir, Path)
    assert flatten(s.model_dump()) == DEFAULTS
    assert s == Settings(_env_file=None)


def test_env_and_flag_names() -> None:
    """env_name and flag_name spell a dotted setting as its env variable and its flag."""
    assert env_name("optim.lr") == "DDPM_OPTIM__LR"
    assert env_name("data.random_flip") == "DDPM_DATA__RANDOM_FLIP"
    assert flag_name("optim.lr") == "--optim.lr"
    assert flag_name("train.batch_size") == "--train.batch_size"


def test_setting_name_inverts_env_name() -> None:
    """setting_name reads any setting's env variable back to its dotted name."""
    assert setting_name("DDPM_OPTIM__LR") == "optim.lr"
    assert all(setting_name(env_name(field)) == field for field in FIELDS)


# Env, `.env`, flags, overrides


def test_non_default_table_covers_every_setting() -> None:
    """The table of non-default values below has exactly one entry per setting."""
    assert set(NON_DEFAULT) == set(FIELDS)
    for field, (value, _) in NON_DEFAULT.items():
        assert value != _json(load_settings(env_file=None))[field], field


@pytest.mark.parametrize("field", FIELDS)
def test_every_setting_by_env_dotenv_flag_and_override(
    field: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each setting is set alike by its env var, a `.env` line, its flag and a dotted override."""
    value, context = NON_DEFAULT[field]
    by_override = load_settings({**context, field: value}, env_file=None)
    assert _json(by_override)[field] == value

    by_flag = load_settings({**context, **parse_flags([flag_name(field), _as_text(value)])})
    assert by_flag == by_override

    dotenv = tmp_path / "settings.env"
    dotenv.write_text(f"{env_name(field)}={_as_text(value)}\n", encoding="utf-8")
    assert load_settings(context, env_file=dotenv) == by_override

    monkeypatch.setenv(env_name(field), _as_text(value))
    assert load_settings(context, env_file=None) == by_override


LISTS = [
    ("model.channel_mult", [1, 2], {"model.arch": "ddpm"}, "1,2,2,2 or [1, 2, 2, 2]"),
    ("model.attention_resolutions", [8, 16], {"model.arch": "ddpm"}, "1,2,2,2"),
    ("eval.metrics", ["kid"], {}, 'fid,kid or ["fid", "kid"]'),
]


@pytest.mark.parametrize(("field", "value", "context", "example"), LISTS)
@pytest.mark.parametrize("form", ["commas", "json"])
def test_a_list_setting_takes_the_same_forms_everywhere(
    field: str, value: list, context: dict, example: str, form: str,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:  # fmt: skip
    """A list setting is set by `1,2` or by JSON `[1, 2]` alike in its env var, a `.env` line,
    its flag and an override (DDPM_MODEL__CHANNEL_MULT=1,2 once failed, blaming model.arch
    too); text that is neither is an error naming that setting alone, with an example of
    its own kind."""
    text = ",".join(map(str, value)) if form == "commas" else json.dumps(value)
    expected = load_settings({**context, field: value}, env_file=None)
    assert load_settings({**context, field: text}, env_file=None) == expected
    assert load_settings({**context, **parse_flags([flag_name(field), text])}) == expected
    dotenv = tmp_path / "settings.env"
    dotenv.write_text(f"{env_name(field)}={text}\n", encoding="utf-8")
    assert load_settings(context, env_file=dotenv) == expected
    monkeypatch.setenv(env_name(field), text)
    assert load_settings(context, env_file=None) == expected

    monkeypatch.setenv(env_name(field), "[1, 2")
    with pytest.raises(SettingsError) as err:
        load_settings(context, env_file=None)
    assert err.value.fields == [field] and example in str(err.value), str(err.value)


def test_settings_are_validated_once_per_process_for_the_same_inputs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The command line validates the settings and the flow it runs asks again with the same
    overrides: the second call validates nothing and returns equal settings (a copy); another
    override, environment variable or `.env` text validates afresh."""
    import settings.loading

    calls = []
    real = settings.loading._validate
    monkeypatch.setattr(settings.loading, "_validate", lambda *a: calls.append(a) or real(*a))
    dotenv = tmp_path / "run.env"
    first = load_settings({"optim.lr": 1e-3}, env_file=dotenv)
    again = load_settings({"optim.lr": 1e-3}, env_file=dotenv)
    assert again == first and again is not first and len(calls) == 1
    load_settings({"optim.lr": 2e-3}, env_file=dotenv)
    monkeypatch.setenv("DDPM_TRAIN__EPOCHS", "3")
    assert load_settings({"optim.lr": 2e-3}, env_file=dotenv).train.epochs == 3
    dotenv.write_text("DDPM_TRAIN__EPOCHS=4\n")
    monkeypatch.delenv("DDPM_TRAIN__EPOCHS")
    assert load_settings({"optim.lr": 2e-3}, env_file=dotenv).train.epochs == 4
    assert len(calls) == 4


def test_env_var_sets_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """DDPM_OPTIM__LR sets optim.lr and leaves the rest of the group at its defaults."""
    monkeypatch.setenv("DDPM_OPTIM__LR", "1e-3")
    s = load_settings(env_file=None)
    assert s.optim.lr == 1e-3
    assert s.optim.name == "adam"
    assert s.optim.momentum == 0.9


def test_dotenv_file_sets_field(tmp_path: Path) -> None:
    """A `.env` file passed as env_file sets a field; a missing one is fine."""
    dotenv = tmp_path / "run.env"
    dotenv.write_text("# comment\nDDPM_TRAIN__EPOCHS=7\nDDPM_DATA__RANDOM_FLIP=false\n")
    s = load_settings(env_file=dotenv)
    assert s.train.epochs == 7
    assert s.data.random_flip is False
    assert load_settings(env_file=tmp_path / "missing.env") == load_settings(env_file=None)


def test_dotenv_in_cwd_is_read_by_default_only(tmp_path: Path) -> None:
    """load_settings() reads ./.env by default, and env_file=None reads no `.env` at all."""
    (tmp_path / ".env").write_text("DDPM_TRAIN__EPOCHS=7\n")
    assert load_settings().train.epochs == 7
    assert load_settings(env_file=None).train.epochs == 100


def test_dotenv_with_other_tools_variables(tmp_path: Path) -> None:
    """A `.env` that also holds other tools' variables (WANDB_API_KEY) still loads."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("WANDB_API_KEY=0123456789abcdef\nDDPM_TRAIN__EPOCHS=7\n")
    assert load_settings(env_file=dotenv).train.epochs == 7


def test_env_beats_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An env var wins over the same setting in `.env`; other `.env` settings still apply."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("DDPM_OPTIM__LR=1e-3\nDDPM_TRAIN__EPOCHS=7\n")
    monkeypatch.setenv("DDPM_OPTIM__LR", "2e-3")
    s = load_settings(env_file=dotenv)
    assert s.optim.lr == 2e-3
    assert s.train.epochs == 7


def test_overrides_beat_env_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dotted overrides and parsed flags win over env and `.env`; unrelated env settings apply."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("DDPM_OPTIM__LR=1e-3\nDDPM_TRAIN__EPOCHS=7\n")
    monkeypatch.setenv("DDPM_OPTIM__LR", "2e-3")
    monkeypatch.setenv("DDPM_OPTIM__MOMENTUM", "0.5")
    s = load_settings({"optim.lr": 3e-3}, env_file=dotenv)
    assert (s.optim.lr, s.optim.momentum, s.train.epochs) == (3e-3, 0.5, 7)
    assert load_settings(parse_flags(["--optim.lr", "3e-3"]), env_file=dotenv) == s


def test_override_replaces_a_bad_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid env value overridden by a valid override is never validated on its own."""
    monkeypatch.setenv("DDPM_OPTIM__LR", "-1")
    assert load_settings({"optim.lr": 1e-3}, env_file=None).optim.lr == 1e-3


def test_flag_env_and_override_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--optim.lr 3e-4`, `DDPM_OPTIM__LR=3e-4` and {"optim.lr": 3e-4} give the same Settings."""
    by_override = load_settings({"optim.lr": 3e-4}, env_file=None)
    by_flag = load_settings(parse_flags(["--optim.lr", "3e-4"]), env_file=None)
    by_flag_eq = load_settings(parse_flags(["--optim.lr=3e-4"]), env_file=None)
    monkeypatch.setenv("DDPM_OPTIM__LR", "3e-4")
    by_env = load_settings(env_file=None)
    assert by_override.optim.lr == 3e-4
    assert by_override == by_flag == by_flag_eq == by_env


@pytest.mark.parametrize(
    ("text", "expected"),
    [("false", False), ("False", False), ("0", False), ("true", True), ("1", True)],
)
def test_booleans_by_flag_and_env(
    text: str, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Booleans are read from a flag value and an env var (`false`, `0`, `true`, `1`)."""
    by_flag = load_settings(parse_flags(["--data.random_flip", text]), env_file=None)
    assert by_flag.data.random_flip is expected
    monkeypatch.setenv("DDPM_DATA__RANDOM_FLIP", text)
    assert load_settings(env_file=None).data.random_flip is expected


def test_whole_group_override_merges_with_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-group override ({"optim": {...}}) keeps env settings of that group it omits."""
    monkeypatch.setenv("DDPM_OPTIM__LR", "1e-3")
    s = load_settings({"optim": {"momentum": 0.5}}, env_file=None)
    assert (s.optim.lr, s.optim.momentum) == (1e-3, 0.5)


# Validation errors name the field

BAD = [
    ("optim.lr", {"optim.lr": -1}, ""),
    ("optim.lr", {"optim.lr": 0}, ""),
    ("optim.lr", {"optim.lr": float("nan")}, ""),
    ("optim.lr", {"optim.lr": float("inf")}, ""),
    ("optim.grad_clip", {"optim.grad_clip": float("inf")}, ""),
    ("optim.name", {"optim.name": "lion"}, "lion"),
    ("optim.momentum", {"optim.momentum": 1.5}, "1.5"),
    ("model.hidden_size", {"model.hidden_size": 12}, "12"),
    ("model.channels", {"model.channels": 1}, "cifar10"),
    ("data.image_size", {"data.image_size": 48}, "48"),
    ("data.image_size", {"data.image_size": 64}, "cifar10"),
    ("data.dataset", {"data.dataset": "imagenet"}, "imagenet"),
    ("data.folder", {"data.dataset": "folder"}, "folder"),
    (
        "data.loader",
        {
            "data.dataset": "folder",
            "data.folder": "pics",
            "data.loader": "device",
            "data.prepare": "off",
        },
        "data.prepare=auto",
    ),
    ("diffusion.num_timesteps", {"diffusion.num_timesteps": 0}, ""),
    (
        "diffusion.beta_end",
        {"diffusion.beta_start": 0.5, "diffusion.beta_end": 0.1},
        "beta_start",
    ),
    ("train.device", {"train.device": "tpu"}, "tpu"),
    ("train.device", {"train.device": "cuda:\u0661"}, ""),  # an Arabic-Indic digit one
    ("train.batch_size", {"train.batch_size": 0}, ""),
    ("train.epochs", {"train.epochs": 0}, ""),
    ("run.name", {"run.name": "../escape"}, "../escape"),
    ("run.name", {"run.name": "/abs"}, "/abs"),
    ("sample.sampler", {"sample.sampler": "lms"}, "lms"),
    ("sample.steps", {"sample.sampler": "dpmpp_2m", "sample.steps": 5000}, "1000"),
    ("diffusion.schedule", {"diffusion.schedule": "quadratic"}, "quadratic"),
    ("diffusion.prediction", {"diffusion.prediction": "noise"}, "noise"),
    ("diffusion.loss_weighting", {"diffusion.loss_weighting": "snr"}, "snr"),
    ("diffusion.min_snr_gamma", {"diffusion.min_snr_gamma": 0}, "0"),
    ("sample.steps", {"sample.steps": 5000}, "1000"),
    ("sample.steps", {"diffusion.num_timesteps": 10}, "10"),
    ("sample.eta", {"sample.eta": 1.5}, "1.5"),
    ("wandb.mode", {"wandb.mode": "sometimes"}, "sometimes"),
    ("optim.lrr", {"optim.lrr": 1}, "unknown"),
    ("model.checkpointing", {"model.checkpointing": True}, "model.arch=ddpm"),
    (
        "model.augment_labels",
        {"model.augment_labels": True, "data.random_flip": False},
        "random_flip",
    ),
    ("train.accumulate", {"train.accumulate": 0}, "0"),
    ("train.accumulate", {"train.batch_size": 4, "train.accumulate": 8}, "train.batch_size (4)"),
    ("train.max_restarts", {"train.max_restarts": -1}, "-1"),
]


@pytest.mark.parametrize(
    ("field", "overrides", "mentions"),
    BAD,
    ids=[f"{field}={next(iter(o.values()))!r}" for field, o, _ in BAD],
)
def test_invalid_override_names_its_field(
    field: str, overrides: dict[str, Any], mentions: str
) -> None:
    """Each invalid setting raises SettingsError naming the field, its env var and its flag."""
    with pytest.raises(SettingsError) as info:
        load_settings(overrides, env_file=None)
    _names_field(info.value, field)
    assert mentions in str(info.value)


@pytest.mark.parametrize("how", ["override", "env"])
def test_beta_start_above_default_beta_end_is_rejected(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """beta_start set alone above the default beta_end (0.02) is an error naming a beta field."""
    if how == "env":
        monkeypatch.setenv("DDPM_DIFFUSION__BETA_START", "0.5")
    overrides = {"diffusion.beta_start": 0.5} if how == "override" else None
    with pytest.raises(SettingsError) as info:
        load_settings(overrides, env_file=None)
    named = set(info.value.fields) & {"diffusion.beta_start", "diffusion.beta_end"}
    assert named, str(info.value)
    for field in named:
        _names_field(info.value, field)


def test_every_invalid_field_is_reported() -> None:
    """Several invalid settings are all reported in one SettingsError."""
    with pytest.raises(SettingsError) as info:
        load_settings({"optim.lr": -1, "train.epochs": 0, "wandb.mode": "x"}, env_file=None)
    for field in ("optim.lr", "train.epochs", "wandb.mode"):
        _names_field(info.value, field)


@pytest.mark.parametrize(
    ("var", "text", "field"),
    [
        ("DDPM_OPTIM__LR", "-1", "optim.lr"),
        ("DDPM_OPTIM__LR", "nan", "optim.lr"),
        ("DDPM_OPTIM__LR", "fast", "optim.lr"),
        ("DDPM_MODEL__HIDDEN_SIZE", "12", "model.hidden_size"),
        ("DDPM_TRAIN__DEVICE", "tpu", "train.device"),
        ("DDPM_DATA__RANDOM_FLIP", "maybe", "data.random_flip"),
        ("DDPM_OPTIM__LRR", "1", "optim.lrr"),
    ],
)
def test_invalid_env_var_names_it(
    var: str, text: str, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad or misspelt DDPM_ env var raises SettingsError naming that env var."""
    monkeypatch.setenv(var, text)
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=None)
    _names_field(info.value, field)
    assert var in str(info.value)


@pytest.mark.parametrize("var", ["DDPM_OPTIMM__LR", "DDPM_OPTIM_LR"])
def test_misspelt_group_env_var_is_an_error(var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DDPM_ env var naming no setting (misspelt group or delimiter) is an error, not ignored."""
    monkeypatch.setenv(var, "1e-3")
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=None)
    assert var in str(info.value)


def test_misspelt_dotenv_line_names_it(tmp_path: Path) -> None:
    """A misspelt setting in `.env` raises SettingsError naming its env var."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("DDPM_OPTIM__LRR=1e-3\n")
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=dotenv)
    _names_field(info.value, "optim.lrr")


def test_invalid_flag_value_names_the_flag() -> None:
    """A parsed flag with a bad value fails on load, naming `--optim.lr`."""
    with pytest.raises(SettingsError) as info:
        load_settings(parse_flags(["--optim.lr", "-1"]), env_file=None)
    _names_field(info.value, "optim.lr")


# Property: any single setting either loads valid or fails naming a field

DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
# A setting whose value can make another setting invalid (the error then names that one).
PARTNERS = {
    "data.dataset": {"data.folder"},
    "diffusion.beta_start": {"diffusion.beta_end"},
    "diffusion.num_timesteps": {"sample.steps"},
    "sweep.storage": {"sweep.trial"},  # the sweep sets the three together
    "sweep.study": {"sweep.trial"},
}
NEAR_MISSES = (
    "",
    "nan",
    "inf",
    "-inf",
    "1e-3",
    "-1",
    "0",
    "true",
    "false",
    "cpu",
    "cuda:1",
    "tpu",
    "folder",
    "cifar10",
    "ddpm",
    "ddim",
    "offline",
    "../x",
    "/abs",
    ".hidden",
    "a/b",
    "run",
)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, 1, -1, 8, 12, 32, 48, 64, 5000, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2.0, max_value=2.0),
    st.text(),
    st.sampled_from(NEAR_MISSES),
    st.integers().map(str),
    st.floats().map(str),
)


def _check_invariants(s: Settings) -> None:
    """The documented rules, written independently of settings/config.py."""
    d, m, f, o = s.data, s.model, s.diffusion, s.optim
    t, p, r, w = s.train, s.sample, s.run, s.wandb
    for key, value in flatten(s.model_dump()).items():
        default = DEFAULTS[key]
        if default is None:
            assert value is None or isinstance(value, (str, Path, float)), key
        else:
            assert type(value) is type(default), (key, value)
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
    assert d.dataset in ("cifar10", "folder")
    if d.dataset == "folder":
        assert d.folder is not None
    else:
        assert d.image_size == 32 and m.channels == 3
    assert d.image_size % 32 == 0 and 32 <= d.image_size <= 1024
    assert d.subset >= 0 and 0 <= d.num_workers <= 64
    assert m.hidden_size > 0 and m.hidden_size % 8 == 0
    assert 1 <= m.channels <= 4
    assert f.num_timesteps >= 1
    assert 0 < f.beta_start < f.beta_end < 1
    assert o.name in ("adam", "adamw", "sgd") and o.schedule in ("constant", "cosine")
    assert 0 < o.lr <= 10
    assert 0 <= o.momentum < 1 and 0 <= o.weight_decay <= 1
    assert o.warmup_steps >= 0 and o.grad_clip >= 0
    assert t.epochs >= 1 and t.batch_size >= 1 and t.log_every >= 1 and t.max_bad_steps >= 0
    assert 0 <= t.seed < 2**63
    assert DEVICE.fullmatch(t.device), t.device
    assert 0 <= t.ema_decay < 1
    assert p.every >= 0 and p.num >= 1 and p.steps >= 1
    assert f.schedule in ("linear", "cosine") and f.prediction in ("eps", "v", "x0")
    assert f.loss_weighting in ("uniform", "min_snr") and f.min_snr_gamma > 0
    on_sigma = ("euler", "heun", "dpmpp_2m_karras", "dpmpp_3m_karras")
    assert p.sampler in ("ddpm", "ddim", "dpmpp_2m", *on_sigma)
    if p.sampler in ("ddim", "dpmpp_2m"):
        assert p.steps <= f.num_timesteps
    assert f.formulation == "discrete" or p.sampler in on_sigma
    assert p.s_churn == 0 or p.sampler in ("euler", "heun")
    if r.name is not None:
        assert r.name and "/" not in r.name and "\\" not in r.name
        assert not r.name.startswith(".")
        assert Path(r.name).name == r.name
    assert r.keep >= 1 and r.checkpoint_every >= 0
    assert w.mode in ("auto", "online", "offline", "disabled")
    assert w.project


@hypothesis_settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(field=st.sampled_from(FIELDS), value=VALUES)
@example(field="optim.grad_clip", value=float("inf"))
@example(field="optim.lr", value=float("nan"))
@example(field="train.ema_decay", value="-inf")
@example(field="train.device", value="cuda:\u0661")
@example(field="diffusion.beta_start", value=0.5)
@example(field="diffusion.num_timesteps", value=10)
@example(field="data.dataset", value="folder")
def test_any_single_setting_is_valid_or_named(field: str, value: Any) -> None:
    """Any value for any setting either fails naming a field, or loads satisfying every rule."""
    try:
        s = load_settings({field: value}, env_file=None)
    except SettingsError as err:
        assert err.fields
        assert set(err.fields) <= {field} | PARTNERS.get(field, set()), str(err)
        for bad in err.fields:
            assert env_name(bad) in str(err) and flag_name(bad) in str(err), str(err)
        return
    _check_invariants(s)
    changed = {k for k, v in flatten(s.model_dump()).items() if v != DEFAULTS[k]}
    assert changed <= {field}


# parse_flags


def test_parse_flags_returns_only_given_flags() -> None:
    """parse_flags returns just the flags given, as dotted keys; none given gives {}."""
    assert parse_flags([]) == {}
    flags = parse_flags(["--optim.lr", "3e-4", "--train.epochs=5", "--run.name", "exp"])
    assert set(flags) == {"optim.lr", "train.epochs", "run.name"}
    s = load_settings(flags, env_file=None)
    assert (s.optim.lr, s.train.epochs, s.run.name) == (3e-4, 5, "exp")


@pytest.mark.parametrize(
    "argv",
    [["--optim.lrr", "1"], ["--lr", "1"], ["--optim.lr"], ["positional"]],
)
def test_parse_flags_rejects_unknown_or_incomplete(argv: list[str]) -> None:
    """An unknown flag, a flag without its value or a stray argument raises SettingsError."""
    with pytest.raises(SettingsError) as info:
        parse_flags(argv)
    assert argv[0] in str(info.value)


def test_help_lists_every_setting_and_exits_0(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--help` prints every setting's flag, env var and default, then exits with status 0."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as info:
        parse_flags(["--help"], prog="train")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--optim.lr" in out and "DDPM_OPTIM__LR" in out and "--train.epochs" in out
    for field in FIELDS:
        assert flag_name(field) in out, field
        assert env_name(field) in out, field
    assert "0.0002" in out and "cifar10" in out


# nest / flatten


def test_nest_and_flatten_round_trip() -> None:
    """nest turns dotted keys into groups and flatten turns them back."""
    flat = {"optim.lr": 1e-3, "optim.name": "sgd", "train.epochs": 3, "run.name": None}
    nested = {"optim": {"lr": 1e-3, "name": "sgd"}, "train": {"epochs": 3}, "run": {"name": None}}
    assert nest(flat) == nested
    assert flatten(nested) == flat
    assert nest(flatten(nested)) == nested
    dump = load_settings(env_file=None).model_dump()
    assert nest(flatten(dump)) == dump
    assert nest({}) == {} and flatten({}) == {}


@pytest.mark.parametrize("whole", [{"lr": 1e-3}, {"lr": 1e-3, "momentum": 0.1}])
def test_nest_does_not_depend_on_key_order(whole: dict[str, Any]) -> None:
    """A whole group beside one of its dotted fields nests alike (or fails alike) in any order."""

    def outcome(overrides: dict[str, Any]) -> Any:
        try:
            return nest(overrides)
        except SettingsError as err:
            return ("SettingsError", err.fields)

    group_first = outcome({"optim": dict(whole), "optim.momentum": 0.5})
    field_first = outcome({"optim.momentum": 0.5, "optim": dict(whole)})
    assert group_first == field_first


def test_nest_leaves_its_input_alone() -> None:
    """nest does not modify the overrides mapping (or the group dicts) it is given."""
    group = {"lr": 1e-3}
    overrides = {"optim": group, "optim.momentum": 0.5}
    nest(overrides)
    assert group == {"lr": 1e-3}
    assert overrides == {"optim": {"lr": 1e-3}, "optim.momentum": 0.5}


# JSON round trip


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {**FOLDER, "data.image_size": 64, "run.name": "exp-1", "run.dir": "/tmp/runs"},
        {"optim.lr": 1e-3, "train.device": "cuda:0", "wandb.entity": "me", "run.keep": 1},
    ],
    ids=["defaults", "folder", "mixed"],
)
def test_json_round_trip(overrides: dict[str, Any]) -> None:
    """Settings dump to JSON (paths as strings) and load back equal."""
    s = load_settings(overrides, env_file=None)
    dumped = s.model_dump(mode="json")
    assert isinstance(dumped["data"]["root"], str) and isinstance(dumped["run"]["dir"], str)
    text = json.dumps(dumped)
    assert load_settings(flatten(json.loads(text)), env_file=None) == s
    assert Settings(_env_file=None, **json.loads(text)) == s


def test_core_config_defaults_are_the_settings_defaults() -> None:
    """The core's Config() and the converted default settings agree field by field (on a CPU),
    so a notebook using ddpm.config gets the same run as the command line."""
    from ddpm.config import Config, DataConfig, EvalConfig

    converted = core_config(load_settings({"train.device": "cpu"}, env_file=None))
    assert converted == Config(
        data=DataConfig(root=Path("data").resolve()),
        eval=EvalConfig(cache_dir=Path("runs/fid-stats").resolve()),
    )


def test_core_config_resolves_choices_for_this_machine(tmp_path: Path) -> None:
    """Settings become one typed Config: each setting lands in its concern's object, the
    seed in one place, paths absolute, auto choices resolved (CPU: fp32, no compile, no fused
    kernels)."""
    cfg = load_settings(
        {
            "optim.lr": 1e-3,
            "optim.grad_clip": 0.5,
            "train.batch_size": 16,
            "train.seed": 7,
            "train.device": "cpu",
            "run.checkpoint_every": 50,
            "run.keep": 2,
            "sample.sampler": "ddpm",
            "data.dataset": "folder",
            "data.folder": "images",
        },
        env_file=None,
    )
    config = core_config(cfg)
    assert (config.optim.lr, config.optim.grad_clip, config.train.batch_size) == (1e-3, 0.5, 16)
    assert config.train.seed == 7 and not hasattr(config.data, "seed")
    assert (config.train.checkpoint_every, config.train.keep) == (50, 2)
    assert config.data.folder == tmp_path / "images" and config.data.root.is_absolute()
    assert (config.train.device, config.train.precision) == ("cpu", "fp32")
    assert not (config.train.compile or config.train.fused or config.sample.compile)
    assert config.image_shape == (3, 32, 32)


def test_settings_and_the_core_config_import_without_torch() -> None:
    """`import settings` (what --help needs) and `import ddpm.config` load no torch, and the
    core loads no prefect, wandb, settings or benchmark."""
    import subprocess
    import sys

    light = "import sys, settings, ddpm.config; assert 'torch' not in sys.modules"
    core = (
        "import sys, ddpm.build, ddpm.trainer, ddpm.generate, ddpm.cifar10, ddpm.datasets, "
        "ddpm.image_folders, ddpm.batches, ddpm.run_dir, ddpm.images; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', "
        "'wandb', 'settings', 'benchmarks')]; assert not bad, bad"
    )
    for probe in (light, core):
        subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)


def test_the_paper_networks_settings_name_only_its_runs() -> None:
    """model.arch=ddpm names runs of its own, and its options matter there alone: runs of the
    assignment network keep the names they had before the paper's network existed (the
    default run of then: linear schedule, eps prediction)."""
    then = {"diffusion.schedule": "linear", "diffusion.prediction": "eps"}
    default = load_settings(then, env_file=None)
    assert run_name(default) == "run-43d95f61ac"  # the name of the default run before model.arch
    assert run_name(load_settings({**then, "model.dropout": 0.3}, env_file=None)) == (
        run_name(default)
    )
    paper = load_settings({**then, "model.arch": "ddpm"}, env_file=None)
    assert run_name(paper) != run_name(default)
    paper_dropout = load_settings(
        {**then, "model.arch": "ddpm", "model.dropout": 0.3}, env_file=None
    )
    assert run_name(paper_dropout) != run_name(paper)


def test_runs_from_before_the_diffusion_choices_keep_their_names() -> None:
    """diffusion.schedule, prediction and loss_weighting name a run only away from what every
    run had before they existed (linear, eps, uniform): such a run keeps its name. A cosine run
    is not renamed by the linear schedule's betas, nor a uniform one by min_snr_gamma."""
    legacy = {"diffusion.schedule": "linear", "diffusion.prediction": "eps",
              "diffusion.loss_weighting": "uniform"}  # fmt: skip
    assert run_name(load_settings(legacy, env_file=None)) == "run-43d95f61ac"
    names = {
        run_name(load_settings({**legacy, key: value}, env_file=None))
        for key, value in [("diffusion.schedule", "cosine"), ("diffusion.prediction", "v"),
                           ("diffusion.prediction", "x0"),
                           ("diffusion.loss_weighting", "min_snr")]
    }  # fmt: skip
    assert len(names) == 4 and "run-43d95f61ac" not in names
    assert run_name(load_settings({**legacy, "diffusion.min_snr_gamma": 1.0}, env_file=None)) == (
        "run-43d95f61ac"
    )
    cosine = {**legacy, "diffusion.schedule": "cosine"}
    assert run_name(load_settings({**cosine, "diffusion.beta_end": 0.03}, env_file=None)) == (
        run_name(load_settings(cosine, env_file=None))
    )
    weighted = {**legacy, "diffusion.loss_weighting": "min_snr"}
    assert run_name(load_settings({**weighted, "diffusion.min_snr_gamma": 1.0}, env_file=None)) != (
        run_name(load_settings(weighted, env_file=None))
    )


def test_a_saved_run_from_before_the_diffusion_choices_reads_as_linear_eps_uniform() -> None:
    """A settings.json written before diffusion.schedule, prediction and loss_weighting
    existed compares as linear, eps and uniform: the same settings find no change, another
    prediction is named with the value the run had."""
    legacy = {"diffusion.schedule": "linear", "diffusion.prediction": "eps",
              "diffusion.loss_weighting": "uniform"}  # fmt: skip
    saved = load_settings(legacy, env_file=None).model_dump(mode="json")
    for key in ("schedule", "prediction", "loss_weighting", "min_snr_gamma"):
        del saved["diffusion"][key]
    assert result_changes(saved, load_settings(legacy, env_file=None)) == []
    changed = load_settings({**legacy, "diffusion.prediction": "v"}, env_file=None)
    assert result_changes(saved, changed) == ["diffusion.prediction: 'eps' -> 'v'"]


def test_an_edm_run_samples_on_sigma_by_default_and_refuses_a_timestep_sampler() -> None:
    """diffusion.formulation edm with no sampler named samples with heun on 18 steps (EDM's
    CIFAR-10 choice); steps named are kept; a timestep sampler named is refused naming
    sample.sampler, churn is refused where the sampler has none, and sigma_min above
    sigma_max is refused; core_config carries every sampler option."""
    edm = load_settings({"diffusion.formulation": "edm"}, env_file=None)
    assert (edm.sample.sampler, edm.sample.steps) == ("heun", 18)
    named = load_settings({"diffusion.formulation": "edm", "sample.steps": 7}, env_file=None)
    assert (named.sample.sampler, named.sample.steps) == ("heun", 7)
    assert load_settings({}, env_file=None).sample.sampler == "dpmpp_2m"  # discrete: as before
    refused = [
        ({"diffusion.formulation": "edm", "sample.sampler": "ddim"}, "sample.sampler"),
        ({"sample.sampler": "dpmpp_3m_karras", "sample.s_churn": 5}, "sample.s_churn"),
        ({"sample.sampler": "heun", "sample.sigma_min": 3, "sample.sigma_max": 2},
         "sample.sigma_min"),
    ]  # fmt: skip
    for overrides, field in refused:
        with pytest.raises(SettingsError) as info:
            load_settings(overrides, env_file=None)
        assert info.value.fields == [field], str(info.value)
    chosen = {"sample.sampler": "heun", "sample.s_churn": 40, "sample.s_tmin": 0.05,
              "sample.s_tmax": 50, "sample.s_noise": 1.003, "sample.rho": 5,
              "sample.sigma_min": 0.01, "sample.sigma_max": 70}  # fmt: skip
    sample = core_config(load_settings(chosen, env_file=None)).sample
    assert {f"sample.{k}": getattr(sample, k) for k in [c[7:] for c in chosen]} == chosen


def test_a_prepared_dataset_is_checked_before_anything_starts(tmp_path: Path) -> None:
    """data.dataset=prepared needs data.folder holding a prepared dataset of data.image_size
    and model.channels: a missing folder, one without prepared.json and one of another size
    are each one error naming the setting and what to do."""
    import numpy as np

    from ddpm.prepared import shard_name, write_manifest, write_shard

    (tmp_path / "plain").mkdir()
    ready = tmp_path / "ready"
    ready.mkdir()
    sha = write_shard(ready / shard_name(0, 1), np.zeros((2, 3, 64, 64), np.uint8))
    write_manifest(ready, (3, 64, 64), [{"file": shard_name(0, 1), "count": 2, "sha256": sha}])
    cases = [
        ({}, r"data\.folder.*is required when data\.dataset is 'prepared'"),
        ({"data.folder": str(tmp_path / "gone")}, r"data\.folder.*no such folder"),
        ({"data.folder": str(tmp_path / "plain")}, r"data\.folder.*not a prepared dataset"),
        ({"data.folder": str(ready)}, r"data\.image_size.*3-channel images of 64 px"),
    ]
    for values, said in cases:
        with pytest.raises(SettingsError, match=said):
            load_settings({"data.dataset": "prepared", **values}, env_file=None)
    cfg = load_settings({"data.dataset": "prepared", "data.folder": str(ready),
                         "data.image_size": 64}, env_file=None)  # fmt: skip
    assert cfg.data.folder == ready


def test_a_prepared_dataset_url_is_kept_whole_and_its_mistakes_named() -> None:
    """data.folder s3://... for dataset=prepared stays the URL (a Path would fold its //);
    a URL for dataset=folder, a scheme pyarrow.fs does not read, and credentials in the URL
    are each refused naming data.folder, the secret masked."""
    ok = load_settings({"data.dataset": "prepared", "data.folder": "s3://bucket/cifar"})
    assert ok.data.folder == "s3://bucket/cifar"
    assert load_settings({"data.dataset": "folder", "data.folder": "."}).data.folder == Path(".")
    for overrides, said in [
        ({"data.dataset": "folder", "data.folder": "gs://b/x"}, "set data.dataset=prepared"),
        ({"data.dataset": "prepared", "data.folder": "ftp://b/x"}, "ftp://, which is not read"),
        ({"data.dataset": "prepared", "data.folder": "s3://AKIA:hunter2@b/x"}, "AKIA:\\*\\*\\*@b"),
    ]:
        with pytest.raises(SettingsError, match=rf"data.folder .*{said}") as err:
            load_settings(overrides)
        assert "hunter2" not in str(err.value)
