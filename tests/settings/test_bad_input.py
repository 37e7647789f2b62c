"""Bad input by the thousand (issue 34): every setting through each of its doors (environment,
`.env`, flags, overrides), sweep specs of any shape, and each command's flags, with generated
values. Each case must end in the documented outcome: accepted, and then the result keeps the
documented rules, or refused with the product's error for users (a one-line `UserError` naming
the setting's env name and flag, or the file), or argparse's exit 2; never a traceback.

Each kind counts its accepted and refused cases, prints them (`pytest -s`), and fails unless both
occurred: a property that never generates a bad case proves nothing. The Hypothesis profile
(tests/conftest.py) sets how many cases: `ci` by default, `--hypothesis-profile=thorough` more.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types
import pytest
import yaml
from case_tally import Tally
from dotenv import dotenv_values
from hypothesis import assume, example, given, note
from hypothesis import strategies as st

import flows.cli as cli
import flows.commands as commands
from ddpm.marked_folders import check_export_target, write_marker
from settings import (
    Settings,
    SettingsError,
    env_name,
    flag_name,
    flatten,
    load_settings,
    parse_flags,
    setting_name,
)
from settings.loading import known_settings
from settings.sampling import GenerateOptions, OptionsError
from settings.sweep import Range, SpecError, SweepSpec, planned, read_spec, spec_from

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# Counting cases: every kind must see both outcomes

TALLY = Tally("test_bad_input")
_summary = TALLY.summary()

# ---------------------------------------------------------------------------------------------
# Settings and the values tried for each


def _field_info(field: str) -> Any:
    group, name = field.split(".")
    return Settings.model_fields[group].annotation.model_fields[name]


FIELDS = known_settings()
DEFAULTS: dict[str, Any] = flatten(Settings.model_construct().model_dump())
# A setting whose value can make another setting invalid (the error then names that one).
PARTNERS = {
    "data.dataset": {"data.folder"},
    "diffusion.beta_start": {"diffusion.beta_end"},
    "diffusion.num_timesteps": {"sample.steps"},
    "sweep.storage": {"sweep.trial"},
    "sweep.study": {"sweep.trial"},
}
NEAR_MISSES = (
    "", " ", "nan", "inf", "-inf", "1e-3", "-1", "0", "1", "2", "true", "false", "yes", "None",
    "null", "cpu", "cuda:1", "cuda:\u0661", "tpu", "folder", "cifar10", "ddpm", "ddim", "offline",
    "../x", "/abs", ".hidden", "a/b", "imgs", "missing", ".", "weights.pth", "1,2", "[1, 2]",
    "[1,", "[]", "{}", '{"a": 1}', "fid,kid", "fid,xid", "[\"fid\"]", "1e400", "2**63", "0x10",
    "1_000", "sqlite:///s.db", "postgresql://u:pw@host/db", "https://h/x.tar.gz?password=p",
)  # fmt: skip


def _literals(annotation: Any) -> list[str]:
    """The choices of every Literal inside an annotation (list[Literal[...]] too)."""
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    return [c for arg in get_args(annotation) for c in _literals(arg)]


def _interesting(field: str) -> list[str]:
    """Texts close to the edge of what a setting accepts: its choices, its bounds and one past
    them, its default."""
    info, default = _field_info(field), DEFAULTS[field]
    texts = {_as_text(default), *_literals(info.annotation)}
    for bound in info.metadata:
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            b = getattr(bound, name, None)
            if isinstance(b, (int, float)) and not isinstance(b, bool):
                texts |= {str(b), str(b - 1), str(b + 1), repr(b * (1 + 1e-9)), repr(b / 2)}
        if isinstance(bound, annotated_types.MaxLen):
            texts.add(",".join(["1"] * (bound.max_length + 1)))
    return sorted(texts)


def _as_text(value: Any) -> str:
    """How a value is written in an env var, a `.env` line or a flag (lists as JSON)."""
    if isinstance(value, list):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


# Text a variable or an argument can hold: no NUL, no lone surrogates.
ARG_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)


def _texts(field: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(_interesting(field)),
        st.sampled_from(NEAR_MISSES),
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.floats().map(repr),
        ARG_TEXT,
    )


# Built once: a strategy is validated on first use, and flatmap would otherwise build a new one
# (and validate it again) for every case.
TEXTS = {f: _texts(f) for f in FIELDS}
FIELD_AND_TEXT = st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f), TEXTS[f]))
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=6,
)  # fmt: skip
PY_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from([0, 1, -1, 8, 32, 64, 5000, 2**63, 10**400, 0.5, 1e-3, True, False]),
    st.floats(min_value=-2.0, max_value=2.0),
    st.tuples(st.integers(-2, 64), st.integers(-2, 64)),
    st.just(Path("imgs")),
    st.just(b"bytes"),
)
VALUES = {f: st.one_of(TEXTS[f], PY_VALUES) for f in FIELDS}
FIELD_AND_VALUE = st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f), VALUES[f]))

DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


# Defaults that follow another setting (README, Settings): an edm run samples with heun on 18
# steps unless a sampler is named.
FOLLOWERS = {"diffusion.formulation": ("sample.sampler", "sample.steps")}


def _keeps_the_rules(s: Settings) -> None:
    """The documented rules (README, Settings), written independently of settings/config.py,
    and that the settings, saved as settings.json saves them, load back the same."""
    d, m, f, o, t, p, r = s.data, s.model, s.diffusion, s.optim, s.train, s.sample, s.run
    for key, value in flatten(s.model_dump()).items():
        default = DEFAULTS[key]
        if default is None:
            assert value is None or isinstance(value, (str, Path, int, float)), key
        else:
            assert type(value) is type(default), (key, value)
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
    assert (d.dataset == "folder") == (d.folder is not None)
    if d.folder is not None:
        assert d.folder.is_dir()
    if d.dataset == "cifar10":
        assert d.image_size == 32 and m.channels == 3
    else:
        assert d.loader != "device"
    assert d.image_size % 32 == 0 and 32 <= d.image_size <= 1024
    assert d.subset >= 0 and 0 <= d.num_workers <= 64
    assert 8 <= m.hidden_size <= 4096 and m.hidden_size % 8 == 0 and 1 <= m.channels <= 4
    if m.arch == "ddpm":
        assert m.hidden_size % 32 == 0
        assert set(m.attention_resolutions) <= {d.image_size >> i for i in
                                                range(len(m.channel_mult))}  # fmt: skip
    assert 1 <= len(m.channel_mult) <= 8 and all(1 <= c <= 64 for c in m.channel_mult)
    assert not m.checkpointing or m.arch == "ddpm"
    assert m.init_from is None or m.init_from.is_dir()
    assert 1 <= f.num_timesteps <= 100_000 and 0 < f.beta_start < f.beta_end < 1
    assert 0 < o.lr <= 10 and 0 <= o.momentum < 1 and 0 <= o.weight_decay <= 1
    assert o.warmup_steps >= 0 and o.grad_clip >= 0
    assert t.epochs >= 1 and t.batch_size >= 1 and t.log_every >= 1 and t.max_bad_steps >= 0
    assert 0 <= t.seed < 2**63 and DEVICE.fullmatch(t.device) and 0 <= t.ema_decay < 1
    assert t.accumulate <= t.batch_size and t.devices <= t.batch_size
    assert p.every >= 0 and p.num >= 1 and p.steps >= 1 and 0 <= p.eta <= 1
    timestep_samplers = ("ddpm", "ddim", "dpmpp_2m")  # the rest step on Karras sigmas
    if p.sampler in ("ddim", "dpmpp_2m"):
        assert p.steps <= f.num_timesteps
    assert f.formulation == "discrete" or p.sampler not in timestep_samplers
    assert f.sigma_data is None or 0 < f.sigma_data <= 100
    assert f.p_std > 0 and p.rho > 0 and p.s_noise >= 0 and p.s_tmin >= 0
    assert p.s_churn == 0 or p.sampler in ("euler", "heun")
    assert not (p.sigma_min and p.sigma_max) or p.sigma_min <= p.sigma_max
    assert s.eval.weights is None or s.eval.weights.is_file()
    assert s.eval.metrics and set(s.eval.metrics) <= {"fid", "kid"}
    assert r.name is None or RUN_NAME.fullmatch(r.name)
    assert r.keep >= 1 and r.checkpoint_every >= 0 and 0 < r.stop_timeout <= 3600
    assert s.wandb.project
    sweep = (s.sweep.storage, s.sweep.study, s.sweep.trial)
    assert all(v is None for v in sweep) or all(v is not None for v in sweep)
    for url in (d.url, s.sweep.storage or ""):
        assert ":pw@" not in url and "?password=" not in url.lower(), url
    with _environ({}, clear=True):
        again = load_settings(flatten(s.model_dump(mode="json")), env_file=None)
    assert again == s


def _refusal_names(err: SettingsError, field: str, door: str) -> None:
    """A refusal of one bad value: one line, naming the setting (or a partner it broke) with
    its env name and flag, and the door it came through."""
    message = str(err)
    entries = all(f == field and m.startswith("entry ") for f, m in err.problems)
    if not entries:  # a list's bad entries get a line each
        assert "\n" not in message, f"more than one line for one bad value:\n{message}"
    assert set(err.fields) <= {field, ""} | PARTNERS.get(field, set()), message
    named = err.fields[0]
    if named:
        assert env_name(named) in message and flag_name(named) in message, message
    if named in ("", field):
        assert door in message, f"{door} not named: {message}"


def _settings_case(kind: str, field: str, load: Callable[[], Settings], door: str) -> Any:
    """Run one case: accepted -> the rules hold and only `field` changed; refused -> the
    one-line SettingsError naming it. Returns the settings or the error's fields."""
    try:
        s = load()
    except SettingsError as err:
        _refusal_names(err, field, door)
        TALLY[kind]["refused"] += 1
        return ("refused", sorted(set(err.fields)))
    changed = {k for k, v in flatten(s.model_dump()).items() if v != DEFAULTS[k]}
    assert changed <= {field, *FOLLOWERS.get(field, ())}, changed
    _keeps_the_rules(s)
    TALLY[kind]["accepted"] += 1
    return ("accepted", s.model_dump())


@contextlib.contextmanager
def _environ(values: dict[str, str], clear: bool = False) -> Iterator[None]:
    """os.environ with `values` set (and every DDPM_ variable removed, when clear), put back
    after."""
    saved = dict(os.environ)
    if clear:
        for name in [n for n in os.environ if n.upper().startswith("DDPM_")]:
            del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _paths_the_values_name(tmp_path: Path) -> None:
    """The folder and file that values such as 'imgs' and 'weights.pth' name, in the test's
    working folder."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "weights.pth").write_bytes(b"not really weights")


def _single_quoted_ok(text: str) -> bool:
    """Whether a value can be written as a `.env` line NAME='text' and read back as it is."""
    return not any(c in text for c in "'\\\n\r\x00$") and text == text.strip()


# ---------------------------------------------------------------------------------------------
# The four doors of every setting


def test_every_setting_through_the_environment() -> None:
    """Any text in any setting's DDPM_ variable is accepted keeping every rule, or refused in
    one line naming the variable and the flag; the overrides door agrees with it."""

    @given(case=FIELD_AND_TEXT)
    @example(case=("train.device", "cuda:\u0661"))
    @example(case=("data.folder", "imgs"))
    @example(case=("model.init_from", "missing"))
    @example(case=("model.init_from", "two\nlines"))
    def cases(case: tuple[str, str]) -> None:
        field, text = case
        with _environ({env_name(field): text}):
            got = _settings_case("env", field, lambda: load_settings(env_file=None),
                                 env_name(field))  # fmt: skip
        same = _settings_case(
            "overrides(text)", field, lambda: load_settings({field: text}, env_file=None), field
        )
        assert got == same, f"the environment and the overrides disagree: {got} != {same}"

    cases()
    TALLY.saw("env", "accepted", "refused")


def test_every_setting_through_a_dotenv_file(tmp_path: Path) -> None:
    """Any value on a setting's `.env` line is read as the same variable would be: accepted
    keeping every rule, or refused in one line naming it."""
    dotenv = tmp_path / ".env"

    @given(case=FIELD_AND_TEXT, quoted=st.booleans())
    @example(case=("optim.lr", "2e-4"), quoted=False)
    def cases(case: tuple[str, str], quoted: bool) -> None:
        field, text = case
        assume(_single_quoted_ok(text))
        plain = re.fullmatch(r"[\w.:/,+\-\[\]]+", text) is not None
        value = text if plain and not quoted else f"'{text}'"
        dotenv.write_text(f"# a comment\nOTHER_TOOL=1\n{env_name(field)}={value}\n")
        got = _settings_case(".env", field, lambda: load_settings(env_file=dotenv),
                             env_name(field))  # fmt: skip
        with _environ({env_name(field): text}):
            same = _settings_case("env(again)", field, lambda: load_settings(env_file=None),
                                  env_name(field))  # fmt: skip
        assert got == same, f".env and the environment disagree on {value!r}: {got} != {same}"

    cases()
    TALLY.saw(".env", "accepted", "refused")


def test_every_setting_through_its_flag() -> None:
    """Any text after any setting's flag (`--f v` or `--f=v`) is accepted keeping every rule,
    or refused in one line naming the flag; never a traceback."""

    @given(case=FIELD_AND_TEXT, joined=st.booleans())
    @example(case=("optim.lr", "-1"), joined=False)
    @example(case=("run.name", "--train.epochs"), joined=False)
    def cases(case: tuple[str, str], joined: bool) -> None:
        field, text = case
        argv = [f"{flag_name(field)}={text}"] if joined else [flag_name(field), text]
        note(f"argv: {argv}")
        _settings_case(
            "flags",
            field,
            lambda: load_settings(parse_flags(argv), env_file=None),
            flag_name(field),
        )

    cases()
    TALLY.saw("flags", "accepted", "refused")


def test_every_setting_through_an_override() -> None:
    """Any Python value for any setting's override (as a deployment or train_flow(overrides=)
    passes it) is accepted keeping every rule, or refused in one line naming it."""

    @given(case=FIELD_AND_VALUE)
    @example(case=("optim.lr", float("nan")))
    @example(case=("model.channel_mult", [1, "x"]))
    def cases(case: tuple[str, Any]) -> None:
        field, value = case
        _settings_case(
            "overrides", field, lambda: load_settings({field: value}, env_file=None), field
        )

    cases()
    TALLY.saw("overrides", "accepted", "refused")


GROUPS = sorted(Settings.model_fields)
SOME_KEYS = st.one_of(st.sampled_from(FIELDS), st.sampled_from(GROUPS), st.text(max_size=16))


def test_overrides_of_any_shape() -> None:
    """A mapping of any keys (settings, groups, names that are none) to any values is accepted
    keeping every rule, or refused by a SettingsError naming each bad key; never a traceback."""

    @given(overrides=st.dictionaries(SOME_KEYS, PY_VALUES, max_size=4))
    @example(overrides={"zzzz": 1})
    @example(overrides={"": 1})
    @example(overrides={"optim": {"lr": -1}})
    def cases(overrides: dict[str, Any]) -> None:
        try:
            s = load_settings(overrides, env_file=None)
        except SettingsError as err:
            assert err.problems, str(err)
            lines = str(err).split("\n")
            assert len(lines) == (1 if len(err.problems) == 1 else len(err.problems) + 1)
            TALLY["overrides(any)"]["refused"] += 1
            return
        _keeps_the_rules(s)
        TALLY["overrides(any)"]["accepted"] += 1

    cases()
    TALLY.saw("overrides(any)", "accepted", "refused")


def test_dotenv_files_of_any_text(tmp_path: Path) -> None:
    """A `.env` of any bytes (settings, typos, other tools' lines, damaged lines, another
    encoding) is accepted keeping every rule, or refused with a SettingsError; a line naming
    a DDPM_ variable is never silently dropped."""
    dotenv = tmp_path / ".env"
    good = b"DDPM_OPTIM__LR=3e-4\nDDPM_TRAIN__EPOCHS=5\nWANDB_API_KEY=abc\n"
    lines = st.one_of(
        FIELD_AND_TEXT.map(lambda c: f"{env_name(c[0])}={c[1]}"),
        st.sampled_from(["# comment", "", "export DDPM_TRAIN__EPOCHS=7", "DDPM_OPTIM__LR",
                         "DDPM_OPTIM__LR='0.1", 'DDPM_OPTIM__LR="0.1', "DDPM_OPTIMM__LR=1",
                         "DDPM_OPTIM={\"lr\": 0.1}", "DDPM_OPTIM=x", "garbage", "=1"]),
        ARG_TEXT,
    )  # fmt: skip
    texts = st.one_of(
        st.lists(lines, max_size=4).map(lambda ls: "\n".join(ls).encode()),
        st.binary(max_size=40),
        st.sampled_from([good.decode().encode("utf-16"), b"\xef\xbb\xbf" + good,
                         good + b"DDPM_RUN__NAME=caf\xe9\n", good.replace(b"=", b"\xff=", 1)]),
        st.tuples(st.integers(0, len(good)), st.integers(0, 7)).map(
            lambda at: good[: at[0]] + bytes([good[at[0]] ^ (1 << at[1])]) + good[at[0] + 1 :]
            if at[0] < len(good) else good[: at[0]]
        ),
    )  # fmt: skip

    @given(text=texts)
    @example(text=b"DDPM_OPTIM__LR=\xff\n")
    @example(text=b"DDPM_OPTIM__LR='0.1\n")
    def cases(text: bytes) -> None:
        dotenv.write_bytes(text)
        try:
            s = load_settings(env_file=dotenv)
        except SettingsError as err:
            assert str(err).strip(), "an empty message"
            TALLY[".env(any)"]["refused"] += 1
            return
        ours = re.findall(rb"^[ \t]*(?:export[ \t]+)?(DDPM_\w*)[ \t]*=", text, re.MULTILINE)
        read = {name.upper() for name in dotenv_values(dotenv)}
        dropped = sorted({n.decode().upper() for n in ours} - read)
        assert not dropped, f"{dropped} given in .env but silently ignored"
        _keeps_the_rules(s)
        TALLY[".env(any)"]["accepted"] += 1

    cases()
    TALLY.saw(".env(any)", "accepted", "refused")


# ---------------------------------------------------------------------------------------------
# Misspelt names get "did you mean"


def _distance(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (optimal string alignment): a swap of neighbours is one
    edit, as a typist makes it."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            replace = d[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, replace)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def _typo(name: str, op: str, at: int, char: str) -> str:
    """One edit of name: delete, insert, replace or swap (with the next) at position `at`."""
    i = at % (len(name) + (op == "insert"))
    if op == "delete":
        return name[:i] + name[i + 1 :]
    if op == "insert":
        return name[:i] + char + name[i:]
    if op == "replace":
        return name[:i] + char + name[i + 1 :]
    j = min(i + 1, len(name) - 1)
    return name[:i] + name[j] + name[i + 1 : j] + name[i] + name[j + 1 :] if j > i else name


EDITS = st.tuples(
    st.sampled_from(["delete", "insert", "replace", "swap"]),
    st.integers(0, 200),
    st.sampled_from("abcdeilmnoprstuvx_.2"),
)
SUGGESTION = re.compile(r"did you mean (\S+?)[?\s]")


# Typos the product once answered with another setting's name.
TYPO_EXAMPLES = {
    "env": [("model.num_res_blocks", ("insert", 10, "_")), ("run.server_timeout", ("replace", 10,
                                                                                 "_"))],
    "flag": [("data.folder", ("swap", 6, "x"))],
    "key": [("data.folder", ("swap", 6, "x"))],
}  # fmt: skip


def _closest(typo: str, names: dict[str, str]) -> set[str]:
    """The settings whose name (in `names`: setting -> name as this door spells it) is fewest
    edits from typo. A one-edit typo of a name that is none is one edit from its setting, so
    only names within one character of its length can tie."""
    near = {f: _distance(typo, n) for f, n in names.items() if abs(len(n) - len(typo)) <= 1}
    return {f for f, d in near.items() if d == 1}


def _misspelt(door: str, field: str, edit: tuple[str, int, str]) -> str:
    """Give one misspelt name through a door; returns the refusal's message."""
    if door == "env":  # the part after DDPM_: the prefix marks our variables
        spelt = _typo(env_name(field).removeprefix("DDPM_"), edit[0], edit[1], edit[2].upper())
        name = "DDPM_" + spelt
        assume(name.upper() not in {env_name(f) for f in FIELDS})
        right = _closest(spelt.upper(), {f: env_name(f).removeprefix("DDPM_") for f in FIELDS})
    else:
        name = _typo(field, *edit)
        assume(name.lower() not in {f.lower() for f in FIELDS} and name not in GROUPS)
        right = _closest(name, {f: f for f in FIELDS})
    assert field in right
    note(f"{door}: {name!r}; closest {sorted(right)}")
    try:
        if door == "env":
            with _environ({name: "1"}):
                load_settings(env_file=None)
        elif door == "flag":
            parse_flags([f"--{name}", "1"])
        else:
            load_settings({name: "1"}, env_file=None)
    except SettingsError as err:
        message = str(err)
        assert "\n" not in message, message
        found = SUGGESTION.search(message)
        assert found, f"no 'did you mean' in: {message}"
        said = found[1].strip("()")
        said = setting_name(said) if said.startswith("DDPM_") else said.removeprefix("--")
        assert said in right, f"suggested {said}, the closest are {sorted(right)}: {message}"
        TALLY[f"typo({door})"]["refused"] += 1
        return message
    TALLY[f"typo({door})"]["accepted"] += 1
    raise AssertionError(f"a misspelt {door} name was accepted silently")


@pytest.mark.parametrize("door", ["env", "flag", "key"])
def test_a_one_edit_typo_of_any_name_suggests_the_right_one(door: str) -> None:
    """A one-edit typo of any setting's env name, flag or override key is refused in one line
    whose "did you mean" names the closest setting."""

    def case(field: str, edit: tuple[str, int, str]) -> None:
        _misspelt(door, field, edit)

    for field, edit in TYPO_EXAMPLES[door]:
        case = example(field=field, edit=edit)(case)
    given(field=st.sampled_from(FIELDS), edit=EDITS)(case)()
    counts = TALLY[f"typo({door})"]
    print(f"typo({door}): {sum(counts.values())} cases {dict(counts)}")
    assert counts["refused"] > 0 and not counts["accepted"], counts


@pytest.mark.parametrize("door", ["env", "dotenv", "flag", "override"])
def test_a_folder_without_the_folder_dataset_names_both(door: str, tmp_path: Path) -> None:
    """data.folder without data.dataset=folder is refused, naming both settings."""
    if door == "env":
        with _environ({"DDPM_DATA__FOLDER": "imgs"}), pytest.raises(SettingsError) as info:
            load_settings(env_file=None)
    elif door == "dotenv":
        (tmp_path / ".env").write_text("DDPM_DATA__FOLDER=imgs\n")
        with pytest.raises(SettingsError) as info:
            load_settings(env_file=tmp_path / ".env")
    else:
        given_ = parse_flags(["--data.folder", "imgs"]) if door == "flag" else {
            "data.folder": "imgs"}  # fmt: skip
        with pytest.raises(SettingsError) as info:
            load_settings(given_, env_file=None)
    message = str(info.value)
    assert "data.folder" in message and "data.dataset" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# Sweep specs of any shape

VALID_SPEC: dict[str, Any] = {
    "name": "bad-input",
    "base": {"train.epochs": 2},
    "vary": {"optim.lr": [1e-4, 2e-4], "model.hidden_size": [16, 32]},
}
SPEC_KEYS = [*SweepSpec.model_fields, "nmae", "varry", "trial", ""]
SETTING_KEYS = st.one_of(st.sampled_from(FIELDS), st.sampled_from(GROUPS), st.text(max_size=10))
SETTING_VALUES = st.one_of(
    st.sampled_from([1e-4, 2e-4, 16, 32, 2, 0, -1, "cosine", "imgs", True, None, 1e9]),
    st.sampled_from(FIELDS).flatmap(TEXTS.__getitem__),
    JSON_VALUES,
)
RANGES = st.fixed_dictionaries(
    {"low": st.sampled_from([0.1, 1, 16, -1, 0]) | st.floats(),
     "high": st.sampled_from([0.5, 2, 64, 0]) | st.floats()},
    optional={"log": st.booleans(), "integer": st.booleans(), "step": st.integers()},
)  # fmt: skip
SPEC_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["bad-input", "a", "Bad", "-x", "a/b", "", "x" * 65]) | ARG_TEXT,
    "deployment": st.sampled_from(["train-flow/ddpm-smoke", "nope", "a/b/c", ""]),
    "metric": st.sampled_from(["epoch/loss", "eval/fid", "eval/kid", "loss"]),
    "goal": st.sampled_from(["minimize", "maximize", "max"]),
    "search": st.sampled_from(["grid", "random", "tpe", "bayes"]),
    "trials": st.sampled_from([None, 0, 1, 3, 10_001, -1, 2.5, "3"]),
    "concurrency": st.sampled_from([1, 4, 0, 257, "2"]),
    "seed": st.sampled_from([0, 7, -1, 2**63]),
    "base": st.dictionaries(SETTING_KEYS, SETTING_VALUES, max_size=3) | JSON_VALUES,
    "vary": st.dictionaries(
        SETTING_KEYS,
        st.lists(SETTING_VALUES, max_size=3) | RANGES | JSON_VALUES,
        max_size=3,
    ) | JSON_VALUES,
    "storage": st.sampled_from([None, "sqlite:///s.db", "postgresql+psycopg://u@h/db",
                                "postgresql://u:pw@h/db", "ftp://x"]),
    "startup_trials": st.sampled_from([0, 4, -1]),
    "warmup_epochs": st.sampled_from([0, 1, -1]),
    "prune": st.sampled_from([True, False, "yes", 2]),
}  # fmt: skip


@st.composite
def specs(draw: st.DrawFn) -> dict[Any, Any]:
    """A spec mapping: the valid one with some keys redrawn, removed or added."""
    spec: dict[Any, Any] = dict(VALID_SPEC)
    for key in draw(st.lists(st.sampled_from(SPEC_KEYS), max_size=3, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            spec.pop(key, None)
        else:
            spec[key] = draw(SPEC_VALUES.get(key, JSON_VALUES))
    if draw(st.integers(0, 9)) == 0:
        spec[draw(st.sampled_from([1, None, 2.5]))] = 1  # a key YAML reads as a non-string
    return spec


def _spec_holds(spec: SweepSpec) -> None:
    """The documented rules of an accepted spec, and every planned trial loads."""
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", spec.name) and spec.vary
    ranges = [k for k, how in spec.vary.items() if isinstance(how, Range)]
    if spec.search == "grid":
        assert not ranges and spec.trials is None
        assert len(planned(spec)) == math.prod(len(h) for h in spec.vary.values())
    else:
        assert spec.trials is not None and spec.trials >= 1
    assert spec.storage is None or spec.search == "tpe"
    for values in planned(spec)[:50]:
        load_settings({**spec.base, **values}, env_file=None)


def _spec_refusal(err: SpecError, where: str) -> None:
    """One line naming where the spec came from, unless it embeds a settings error listing
    several bad settings."""
    message = str(err)
    assert message.startswith(f"{where}: "), message
    if "\n" in message:
        assert "invalid settings:\n" in message, f"several lines for one bad value: {message}"


def test_sweep_specs_of_any_shape() -> None:
    """Any mapping given as a sweep spec (a deployment's parameter) is accepted keeping the
    documented rules, or refused by one SpecError line naming the spec; never a traceback."""

    @given(spec=specs())
    @example(spec={**VALID_SPEC, "vary": {"": [1]}})
    @example(spec={**VALID_SPEC, 1: 2})
    def cases(spec: dict[Any, Any]) -> None:
        try:
            checked = spec_from(spec, "the-parameter")
        except SpecError as err:
            _spec_refusal(err, "the-parameter")
            TALLY["spec(mapping)"]["refused"] += 1
            return
        _spec_holds(checked)
        TALLY["spec(mapping)"]["accepted"] += 1

    cases()
    TALLY.saw("spec(mapping)", "accepted", "refused")


def _flip(data: bytes, at: int, bit: int) -> bytes:
    if not data:
        return data
    at %= len(data)
    return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1 :]


GOOD_YAML = yaml.safe_dump(VALID_SPEC, sort_keys=False).encode()
YAML_TEXTS = st.one_of(
    specs().map(lambda s: yaml.safe_dump(s, sort_keys=False, allow_unicode=True).encode()),
    st.tuples(st.integers(0, 10_000), st.integers(0, 7)).map(lambda a: _flip(GOOD_YAML, *a)),
    st.integers(0, len(GOOD_YAML)).map(lambda n: GOOD_YAML[:n]),
    st.binary(max_size=60),
    st.text(max_size=60).map(str.encode),
    st.sampled_from([GOOD_YAML.decode().encode("utf-16"), b"\xef\xbb\xbf" + GOOD_YAML,
                     GOOD_YAML + b"# caf\xe9\n", b"- a\n- b\n", b"!!python/object:os.system {}",
                     b"a: &x [*x]\n", b"name: [\n", b"\t\x00"]),
)  # fmt: skip


def test_sweep_spec_files_of_any_text(tmp_path: Path) -> None:
    """Any bytes in a sweep spec file (YAML of any shape, damaged, another encoding) are
    accepted keeping the documented rules, or refused by one SpecError line naming the file."""
    path = tmp_path / "sweep.yaml"

    @given(text=YAML_TEXTS)
    @example(text=GOOD_YAML + b"# caf\xe9\n")
    @example(text=b"1: 2\n" + GOOD_YAML)
    def cases(text: bytes) -> None:
        path.write_bytes(text)
        try:
            spec = read_spec(path)
        except SpecError as err:
            _spec_refusal(err, str(path))
            TALLY["spec(file)"]["refused"] += 1
            return
        _spec_holds(spec)
        TALLY["spec(file)"]["accepted"] += 1

    cases()
    TALLY.saw("spec(file)", "accepted", "refused")


# ---------------------------------------------------------------------------------------------
# Each command's flags: one thing wrong at a time


@st.composite
def one_change(
    draw: st.DrawFn, base: list[str], options: list[str], values: st.SearchStrategy[str]
) -> tuple[list[str], str]:
    """A valid argv with one change: an option dropped, its value redrawn, an option added
    (known, misspelt, another command's), a stray word, --help. Returns (argv, the option the
    change is about)."""
    argv = list(base)
    pairs = [i for i, a in enumerate(argv) if a.startswith("--") and i + 1 < len(argv)
             and not argv[i + 1].startswith("--")]  # fmt: skip
    how = draw(st.sampled_from(["drop", "value", "add", "typo", "word", "help", "none"]))
    if how == "drop" and pairs:
        i = draw(st.sampled_from(pairs))
        return argv[:i] + argv[i + 2 :], argv[i]
    if how == "value" and pairs:
        i = draw(st.sampled_from(pairs))
        argv[i + 1] = draw(values)
        joined = draw(st.booleans())
        return ([*argv[:i], f"{argv[i]}={argv[i + 1]}", *argv[i + 2:]] if joined else argv,
                argv[i])  # fmt: skip
    if how == "add":
        option = draw(st.sampled_from(options))
        return argv + [option] + ([] if option in SWITCHES else [draw(values)]), option
    if how == "typo":
        option = draw(st.sampled_from(options))
        op, at, char = draw(EDITS)
        typo = "--" + _typo(option[2:], op, at, char)
        assume(typo not in options)
        return [*argv, typo, draw(values)], typo
    if how == "word":
        word = draw(values)
        return [*argv, word], word
    if how == "help":
        return [*argv, draw(st.sampled_from(["--help", "-h"]))], "--help"
    return argv, ""


SWITCHES = {"--no-ema", "--npz", "--evaluate", "--help", "-h"}  # flags that take no value
SAMPLE_OPTIONS = [
    "--run", "--num", "--out", "--seed", "--sampler", "--steps", "--eta", "--batch-size",
    "--device", "--precision", "--no-ema", "--npz", "--evaluate", "--eval.batch_size",
    "--eval.metrics", "--eval.weights", "--run.debug", "--run.stop_timeout", "--optim.lr",
    "--train.epochs", "--run.name",
]  # fmt: skip
# A word on a command line: any text but a line break (a path holding one is named as it is).
WORD = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n\r"), max_size=12
)
OPTION_VALUES = st.one_of(
    st.sampled_from(["runs/r", "runs/missing", "samples", "mine", "4", "0", "-1", "1e3", "ddim",
                     "ddpm", "euler", "cpu", "cuda:0", "bf16", "fp8", "true", "fid,kid", "x",
                     "weights.pth", "", "-", "--num"]),
    st.integers(-5, 2**64).map(str),
    WORD,
)  # fmt: skip


def _one_line_naming(message: str, names: list[str], also: str = "") -> None:
    """A refusal of one change: one line, naming the option or file it is about (or leaving
    that to the usage argparse printed above it, `also`)."""
    assert "\n" not in message.strip(), f"several lines for one bad value:\n{message}"
    names = [n.partition("=")[0] if n.startswith("-") else n for n in names if n]
    if names and any(n.startswith("-") for n in names):
        assert any(n in message or n in also for n in names), f"{names} not named: {message}"


def _users_folders(tmp_path: Path) -> None:
    """A run folder, a user's folder, and an earlier export, as the values name them."""
    (tmp_path / "runs" / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"a user's photo")
    export = tmp_path / "export"
    export.mkdir()
    (export / "model_index.json").write_text("{}\n")
    write_marker(export, ".ddpm-export.json", "ddpm-export")


def test_sample_command_flags_one_change_at_a_time(tmp_path: Path) -> None:
    """ddpm-sample's flags with one change are accepted (options and settings valid, --run
    existing, --out new or ours) or refused in one line naming the flag; never a traceback."""
    _users_folders(tmp_path)
    base = ["--run", "runs/r", "--num", "4", "--out", "samples"]

    @given(change=one_change(base, SAMPLE_OPTIONS, OPTION_VALUES))
    @example(change=(["--run", "runs/missing", "--num", "2", "--out", "x"], "--run"))
    @example(change=([*base[:4], "--out", "mine"], "--out"))
    @example(change=([*base, "--seed", "-1"], "--seed"))
    def cases(change: tuple[list[str], str]) -> None:
        argv, option = change
        usage = io.StringIO()
        try:
            with contextlib.redirect_stderr(usage), contextlib.redirect_stdout(io.StringIO()):
                options, overrides = commands.parse_sample_args(argv)
                load_settings(overrides)  # as sample_main does
        except SystemExit as exit_:
            assert exit_.code == 0 and option == "--help", (exit_.code, usage.getvalue())
            TALLY["sample flags"]["help"] += 1
            return
        except (OptionsError, SettingsError) as err:
            _one_line_naming(str(err), [option], usage.getvalue())
            TALLY["sample flags"]["refused"] += 1
            return
        assert isinstance(options, GenerateOptions) and options.run.exists()
        assert not (options.out.is_dir() and any(options.out.iterdir()))
        assert all(k.startswith(commands.SAMPLE_SETTINGS) for k in overrides), overrides
        TALLY["sample flags"]["accepted"] += 1

    cases()
    TALLY.saw("sample flags", "accepted", "refused")


@pytest.fixture
def no_flow_runs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """flows.cli.run_flow replaced by a recorder returning 0: a command whose checks passed
    would start its flow (and a Prefect server) here; the list holds its settings."""
    started: list[Any] = []
    monkeypatch.setattr(cli, "run_flow", lambda cfg, load: started.append(cfg) or 0)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return started


def _command(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    """Run a command's main in this process: (exit status, what it printed on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, err.getvalue()


def _command_outcome(kind: str, names: list[str], code: int, stderr: str) -> str:
    """Check a command's ending: 0 with its checks passed, 2 with one `error:` line naming
    the option or file (`names`: either), argparse's usage and one error line naming it, or
    --help's 0."""
    if code == 0 and "--help" in names:
        TALLY[kind]["help"] += 1
        return "help"
    assert "Traceback" not in stderr, stderr
    if code == 0:
        TALLY[kind]["accepted"] += 1
        return "accepted"
    assert code == 2, (code, stderr)
    lines = stderr.strip().split("\n")
    if lines and lines[-1].startswith("error: "):
        _one_line_naming(stderr, names)
    else:  # argparse: "PROG: error: ..." (after the usage, for its own errors)
        assert lines and ": error: " in lines[-1], stderr
        assert len(lines) == 1 or lines[0].startswith("usage:"), stderr
        _one_line_naming(lines[-1], names)
    TALLY[kind]["refused"] += 1
    return "refused"


def _value_of(argv: list[str], option: str) -> str | None:
    """The last value argv gives an option (`--o v` or `--o=v`), as argparse reads it."""
    value = None
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.partition("=")[2]
    return value


EXPORT_OPTIONS = ["--run", "--out", "--no-ema", "--run.name", "--optim.lr"]


def test_export_command_flags_one_change_at_a_time(tmp_path: Path, no_flow_runs) -> None:
    """ddpm-export's flags with one change: it would start (--run exists, --out new, empty
    or an earlier export) or exits 2 with one line naming the flag; never a traceback."""
    _users_folders(tmp_path)
    base = ["--run", "runs/r", "--out", "export/new"]

    @given(change=one_change(base, EXPORT_OPTIONS, OPTION_VALUES))
    @example(change=(["--run", "runs/r", "--out", "mine"], "--out"))
    @example(change=(["--run", "runs/r", "--out", "export"], "--out"))
    @example(change=(["--run", "runs/r", "--out", "runs/r/checkpoints/x"], "--out"))
    @example(change=(["--run=--", "--out", "export/new"], "--run"))
    def cases(change: tuple[list[str], str]) -> None:
        argv, option = change
        before = len(no_flow_runs)
        code, stderr = _command(cli.export_main, argv)
        value = _value_of(argv, option) or ""
        names = [option, value, str(Path(value))] if option in ("--run", "--out") else [option]
        if _command_outcome("export flags", names, code, stderr) == "accepted":
            assert len(no_flow_runs) == before + 1
            assert Path(_value_of(argv, "--run") or "").exists()
            check_export_target(Path(_value_of(argv, "--out") or ""))
        else:
            assert len(no_flow_runs) == before, "the flow started after a refusal"

    cases()
    TALLY.saw("export flags", "accepted", "refused")


def test_sweep_command_flags_one_change_at_a_time(tmp_path: Path, no_flow_runs) -> None:
    """ddpm-sweep's flags with one change: it would start (the spec valid, its folder the
    sweep's) or exits 2 with one line naming the flag or the file; never a traceback."""
    (tmp_path / "good.yaml").write_bytes(GOOD_YAML)
    (tmp_path / "bad.yaml").write_text("name: Bad\nvary: {optim.lr: [1]}\n")
    (tmp_path / "binary.yaml").write_bytes(GOOD_YAML + b"\xff")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "same.yml").write_bytes(GOOD_YAML)
    good = ["good.yaml", "./good.yaml", "specs/same.yml", str(tmp_path / "good.yaml")]
    values = st.one_of(
        st.sampled_from(good),
        st.sampled_from(["bad.yaml", "binary.yaml", "specs", "missing.yaml", ""]),
        OPTION_VALUES,
    )

    @given(change=one_change(["--spec", "good.yaml"], ["--spec", "--name", "--optim.lr"], values))
    @example(change=(["--spec", "specs"], "--spec"))
    @example(change=(["--spec", "binary.yaml"], "--spec"))
    def cases(change: tuple[list[str], str]) -> None:
        argv, option = change
        code, stderr = _command(cli.sweep_main, argv)
        spec = _value_of(argv, "--spec") or ""
        names = [option, spec, str(Path(spec))] if option == "--spec" else [option]
        _command_outcome("sweep flags", names, code, stderr)

    cases()
    TALLY.saw("sweep flags", "accepted", "refused")


# ---------------------------------------------------------------------------------------------
# Checked before anything starts


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PREFECT_API_URL, and a temporary server that fails the test if it is started."""
    import flows.server

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a temporary Prefect server was started")

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(flows.server, "temporary_server", refuse)


BEFORE_ANYTHING = {
    "export --run missing": (cli.export_main, ["--run", "missing", "--out", "x"], "missing"),
    "export --out a user's folder": (cli.export_main, ["--run", "runs/r", "--out", "mine"],
                                     "mine"),
    "sample --run missing": (cli.sample_main, ["--run", "missing", "--num", "2", "--out", "x"],
                             "--run"),
    "sample --out a user's folder": (cli.sample_main,
                                     ["--run", "runs/r", "--num", "2", "--out", "mine"], "mine"),
    "train --data.folder missing": (cli.main, ["--data.dataset", "folder", "--data.folder",
                                               "missing"], "--data.folder"),
    "train --data.folder alone": (cli.main, ["--data.folder", "imgs"], "data.dataset"),
    "train --model.init_from missing": (cli.main, ["--model.init_from", "missing"],
                                        "--model.init_from"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BEFORE_ANYTHING))
def test_bad_paths_are_refused_before_anything_starts(case: str, tmp_path: Path, no_server) -> None:
    """A missing --run, data.folder or model.init_from and a user's --out end the command
    with exit 2 and one line within a couple of seconds, before any Prefect server."""
    _users_folders(tmp_path)
    main, argv, named = BEFORE_ANYTHING[case]
    start = time.monotonic()
    code, stderr = _command(main, argv)
    took = time.monotonic() - start
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and named in stderr, stderr
    assert took < 2.0, f"{took:.1f} s"
    assert "PREFECT_API_URL" not in os.environ
    assert not (tmp_path / "x").exists(), "the output folder was created"


# ---------------------------------------------------------------------------------------------
# Real processes


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, float]:
    """Run a command as a real process without DDPM_ variables or PREFECT_API_URL:
    (exit status, stderr, seconds)."""
    clean = {k: v for k, v in os.environ.items()
             if not k.upper().startswith("DDPM_") and k != "PREFECT_API_URL"}  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(command, cwd=cwd, env={**clean, **env}, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    return done.returncode, done.stderr, time.monotonic() - start


PROCESSES = {
    "train: misspelt flag": ([sys.executable, str(ROOT / "flows" / "train_flow.py"),
                              "--optim.lrr", "1"], {}, "--optim.lr"),
    "train: bad value in the environment": ([sys.executable, str(ROOT / "flows" /
                                             "train_flow.py")], {"DDPM_OPTIM__LR": "-1"},
                                            "DDPM_OPTIM__LR"),
    "ddpm-sample: missing run": ([str(VENV_BIN / "ddpm-sample"), "--run", "missing", "--num",
                                  "2", "--out", "x"], {}, "--run"),
    "ddpm-export: a user's folder": ([str(VENV_BIN / "ddpm-export"), "--run", "runs/r",
                                      "--out", "mine"], {}, "mine"),
    "ddpm-sweep: bad spec": ([str(VENV_BIN / "ddpm-sweep"), "--spec", "bad.yaml"], {},
                             "bad.yaml"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PROCESSES))
def test_commands_refuse_bad_input_in_one_line_at_once(case: str, tmp_path: Path) -> None:
    """Each command, as a real process given one bad input, exits 2 within seconds with one
    line `error: ...` naming it, no traceback and no Prefect server."""
    _users_folders(tmp_path)
    (tmp_path / "bad.yaml").write_text("name: Bad\nvary: {optim.lr: [1]}\n")
    command, env, named = PROCESSES[case]
    code, stderr, took = _run(command, tmp_path, env)
    assert code == 2, stderr
    assert "Traceback" not in stderr and "Prefect server" not in stderr, stderr
    lines = stderr.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], stderr
    assert took < 10, f"{took:.1f} s"
    assert not (tmp_path / "x").exists()
