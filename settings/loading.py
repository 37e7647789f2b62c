"""Loading settings: env (`DDPM_` prefix, `__` between group and field), `.env`, flags and
overrides into one validated `Settings`, and errors that name each bad setting by its env
variable and flag, with a "did you mean" for a misspelt name."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic import ValidationError
from pydantic_settings import CliSettingsSource
from pydantic_settings import SettingsError as _PydanticSettingsError

from ddpm.errors import UserError
from settings.config import Settings
from settings.fields import ENV_DELIMITER, ENV_PREFIX, FieldError, env_name, flag_name, setting_name


class SettingsError(UserError, ValueError):
    """Invalid settings; the message names each bad field's env variable and flag."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)  # (dotted field, what is wrong)
        self.fields = [field for field, _ in self.problems]
        lines = [
            one_line(f"{field} ({env_name(field)} / {flag_name(field)}): {message}" if field
                     else message)
            for field, message in self.problems
        ]  # fmt: skip
        if len(lines) == 1:  # one line, as the command line's last line
            super().__init__(f"invalid setting {lines[0]}" if self.fields[0] else lines[0])
        else:
            super().__init__("invalid settings:\n  " + "\n  ".join(lines))


def known_settings() -> list[str]:
    """Every setting's dotted name ('optim.lr', ...)."""
    return [
        f"{group}.{field}"
        for group, info in Settings.model_fields.items()
        for field in info.annotation.model_fields
    ]


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """'; did you mean X?' for the known name closest to a misspelt one (closest_name), else
    ''."""
    close = closest_name(name, known)
    return f"; did you mean {close}?" if close else ""


def closest_name(name: str, known: Sequence[str]) -> str | None:
    """The known name a misspelt one most likely meant, or None: compared on their letters and
    digits alone (so `DDPM_MODEL__NUM__RES_BLOCKS` finds `DDPM_MODEL__NUM_RES_BLOCKS`), by edit
    distance with a swap of two neighbours counting once (`floder` is `folder`, not
    `loader`), within a third of the name's length."""
    letters = _letters(name)
    scored = sorted((_edits(letters, _letters(k)), i, k) for i, k in enumerate(known))
    if not scored or not letters:
        return None
    edits, _, best = scored[0]
    return best if edits <= max(1, len(letters) // 3) else None


def _letters(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _edits(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and swaps of
    two neighbours, one each."""
    previous, row = None, list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            current[j] = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + (x != y))
            if previous is not None and i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                current[j] = min(current[j], previous[j - 2] + 1)
        previous, row = row, current
    return row[-1]


def _unknown(name: str) -> str:
    """The message for a dotted name that is not a setting, with the closest one's doors."""
    close = closest_name(name, known_settings())
    hint = f"; did you mean {close} ({env_name(close)} / {flag_name(close)})?" if close else ""
    return f"unknown setting{hint} (see --help for the list)"


def one_line(text: str) -> str:
    """text with its line breaks written as \\n, so a value holding one (a path, say) keeps a
    message on one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _problems(err: ValidationError, env_names: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Turn pydantic's errors into (dotted field, message saying what is accepted and got).

    Args:
        env_names: the DDPM_* names the environment and `.env` give: an unknown field that
            came from one (DDPM_MODEL__NUM__RES_BLOCKS arrives as model.num) is matched as the
            whole variable."""
    problems = []
    for e in err.errors():
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            problems.append((cause.field, str(cause)))
            continue
        names = [str(part) for part in e["loc"] if not isinstance(part, int)]
        entries = [part for part in e["loc"] if isinstance(part, int)]  # a list's items
        field = ".".join(names)
        if e["type"] == "extra_forbidden":
            given = [n for n in env_names if n.startswith(env_name(field) + ENV_DELIMITER)]
            if given:  # a variable with a delimiter too many: match the whole name
                known = [env_name(f) for f in known_settings()]
                problems.append(("", f"unknown setting {given[0]}{did_you_mean(given[0], known)} "
                                 "(see --help for the list)"))  # fmt: skip
            else:
                problems.append((field, _unknown(field)))
            continue
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] != "value_error" and not isinstance(e.get("input"), (dict, list)):
            message += f", got {e.get('input')!r}"
        if entries:
            message = f"entry {entries[0] + 1}: {message}"
        problems.append((field, message))
    return problems


def nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """{'optim.lr': 1e-3} -> {'optim': {'lr': 1e-3}}; a key without a dot sets a whole group.

    Dotted keys win over the same field inside a whole-group value, whatever the key order; the
    input is not modified.

    Raises:
        SettingsError: for a key whose group is not a setting group.
    """
    groups = set(Settings.model_fields)
    nested: dict[str, Any] = {}
    for key, value in sorted(overrides.items(), key=lambda kv: "." in str(kv[0])):
        group, _, field = str(key).partition(".")
        if group not in groups:
            raise SettingsError([(str(key), _unknown(str(key)))])
        if not field:
            nested[group] = dict(value) if isinstance(value, Mapping) else value
        elif isinstance(nested.setdefault(group, {}), dict):
            nested[group][field] = value
        else:
            raise SettingsError([(str(key), f"cannot be set beside a non-mapping {group!r}")])
    return nested


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _env_names(env_file: str | Path | None) -> list[str]:
    """The DDPM_* names of the environment and the `.env` file, upper-case, sorted."""
    names = {name.upper() for name in os.environ}
    if env_file is not None and Path(env_file).is_file():
        names |= {name.upper() for name in dotenv_values(env_file)}
    return sorted(name for name in names if name.startswith(ENV_PREFIX))


def _unknown_env_names(env_file: str | Path | None) -> list[tuple[str, str]]:
    """DDPM_* variables (environment or .env) whose group is not a setting group: typos such
    as DDPM_OPTIMM__LR or DDPM_OPTIM_LR, which would otherwise be ignored silently."""
    groups = {group.upper() for group in Settings.model_fields}
    known = [env_name(field) for field in known_settings()]
    problems = []
    for name in _env_names(env_file):
        group = name[len(ENV_PREFIX) :].partition(ENV_DELIMITER)[0]
        if group not in groups:
            hint = did_you_mean(name, known)
            problems.append(("", f"unknown setting {name}{hint} (see --help for the list)"))
    return problems


def load_settings(
    overrides: Mapping[str, Any] | None = None, *, env_file: str | Path | None = ".env"
) -> Settings:
    """Resolve settings from defaults, `.env`, the environment and dotted overrides.

    Args:
        overrides: dotted setting names to values, e.g. {"train.epochs": 3}; highest precedence.
        env_file: the dotenv file to read (missing is fine); None reads none.

    The settings are validated once per process for the same inputs (the overrides, the
    DDPM_* environment and the `.env` file's text): the command line validates them before
    heavy imports, and the flow it runs gets the same object back.

    Raises:
        SettingsError: naming every invalid field with its env variable and flag.
    """
    key = _inputs(overrides, env_file)
    if key not in _VALIDATED:
        _VALIDATED.clear()  # one entry: a process runs one set of settings at a time
        _VALIDATED[key] = _validate(overrides, env_file)
    return _VALIDATED[key].model_copy(deep=True)


_VALIDATED: dict[str, Settings] = {}


def _inputs(overrides: Mapping[str, Any] | None, env_file: str | Path | None) -> str:
    """Everything load_settings reads, as one string."""
    env = sorted((k, v) for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX))
    text = None
    if env_file is not None and Path(env_file).is_file():
        text = Path(env_file).read_bytes().decode(errors="backslashreplace")
    given = {
        "overrides": dict(overrides or {}), "env": env, "file": [str(env_file), text],
        "cwd": os.getcwd(),  # relative paths (eval.weights) are checked from here
    }  # fmt: skip
    return json.dumps(given, sort_keys=True, default=str)


def _check_env_file(env_file: str | Path | None) -> None:
    """A `.env` that cannot be read as a whole is an error naming the file and the line (python-
    dotenv would skip the line with a warning that names no setting, and the run would go on
    without it).

    Raises:
        SettingsError: for a file that is not UTF-8 text, or a line that is not NAME=VALUE.
    """
    from dotenv.parser import parse_stream

    if env_file is None or not Path(env_file).is_file():
        return
    try:
        text = Path(env_file).read_bytes().decode()
    except UnicodeDecodeError as err:
        line = Path(env_file).read_bytes()[: err.start].count(b"\n") + 1
        raise SettingsError([("", f"{env_file}, line {line}: not UTF-8 text")]) from None
    except OSError as err:
        raise SettingsError([("", f"{env_file}: cannot be read ({err.strerror})")]) from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            shown = binding.original.string.strip()[:60]
            raise SettingsError([("", f"{env_file}, line {binding.original.line}: cannot be "
                                  f"read as NAME=VALUE ({shown!r})")])  # fmt: skip


def _validate(overrides: Mapping[str, Any] | None, env_file: str | Path | None) -> Settings:
    _check_env_file(env_file)
    unknown = _unknown_env_names(env_file)
    if unknown:
        raise SettingsError(unknown)
    try:
        return Settings(_env_file=env_file, **nest(overrides or {}))
    except ValidationError as err:
        raise SettingsError(_problems(err, _env_names(env_file))) from None
    except _PydanticSettingsError as err:
        names = set(os.environ)
        if env_file is not None and Path(env_file).is_file():
            names |= set(dotenv_values(env_file))
        given = [setting_name(n.upper()) for n in names if n.upper().startswith(ENV_PREFIX)]
        raise _undecodable(err, given) from None


def _undecodable(err: _PydanticSettingsError, given: Sequence[str]) -> SettingsError:
    """pydantic-settings' error for a value it cannot decode, which names only a group: a
    whole group given as text that is not JSON (every list setting takes its own forms, see
    list_value). The error names the group's settings given, else the group."""
    match = re.search(r'field "(\w+)"', str(err))
    group = match[1] if match else ""
    inside = sorted({f for f in given if f.startswith(f"{group}.")})
    fields = [group] if group in given or not inside else inside
    cause = " ".join(str(err.__cause__ or err).split())
    example = f'{{"{next(iter(Settings.model_fields[group].annotation.model_fields))}": ...}}'
    return SettingsError(
        [(f, f"cannot be decoded ({cause}); give a whole group as JSON, e.g. {example}")
         for f in fields]
    )  # fmt: skip


def parse_flags(argv: Sequence[str], prog: str | None = None) -> dict[str, Any]:
    """Parse `--group.field value` flags into dotted overrides (only the flags given).

    `--help` prints every setting with its env variable and default, then exits.

    Raises:
        SettingsError: for an unknown flag or a flag without a value.
    """
    try:
        source = CliSettingsSource(
            Settings,
            cli_parse_args=list(argv),
            cli_prog_name=prog,
            cli_exit_on_error=False,
            cli_show_env_vars=True,
            cli_avoid_json=True,
            cli_hide_none_type=True,
        )
        return flatten(source())
    except _PydanticSettingsError as err:
        given = [arg[2:].partition("=")[0] for arg in argv if str(arg).startswith("--")]
        if "error parsing value" in str(err):
            raise _undecodable(err, given) from None
        known = {flag_name(field) for field in known_settings()} | {"--help"}
        unknown = [f"--{name}" for name in given if f"--{name}" not in known]
        if unknown:  # argparse's "unrecognized arguments: ..." names them without a hint
            raise SettingsError([
                ("", f"unknown flag {flag}{did_you_mean(flag, known)} (see --help for the list)")
                for flag in unknown
            ]) from None  # fmt: skip
        message = str(err).removeprefix("error parsing CLI: ")
        valueless = re.fullmatch(r"argument --([\w.]+): expected one argument", message)
        if valueless:  # a flag last, or before a value argparse takes for a flag (-inf)
            field = valueless[1]
            raise SettingsError([(field, f"needs a value (one that starts with '-' goes as "
                                  f"--{field}=VALUE)")]) from None  # fmt: skip
        raise SettingsError([("", f"bad flags: {message} (see --help)")]) from None
