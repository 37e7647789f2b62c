"""The pieces every settings group is built from: the env names (`DDPM_` prefix, `__` between
group and field), the base of a group, a cross-field rule's error, and the field types and checks
the groups share (a folder or URL, an optional path, a list in any form, a URL without a
password)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict

ENV_PREFIX = "DDPM_"
ENV_DELIMITER = "__"


class Group(BaseModel):
    # A misspelt env var or override (DDPM_OPTIM__LRR) is an error, not silently ignored.
    # NaN and inf never make sense here (an infinite grad_clip would silently disable it).
    # Defaults are validated too, so beta_start=0.5 is checked against the default beta_end.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False
    )


class FieldError(ValueError):
    """A cross-field rule broken; `field` is the dotted setting the message is about."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def password_in(url: str, instead: str) -> str | None:
    """Why a URL may not be a setting when it carries a password (in its user part, or as a
    `password` query parameter): settings are written to settings.json, the flow run's
    parameters, the logs and the W&B config. None when it carries none. The message shows the
    URL with the password masked, and says where the password goes `instead`."""
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        secret = parts.password is not None or any(k.lower() == "password" for k, _ in query)
    except ValueError:
        return None  # not a URL this check can read; the setting's own checks say so
    if not secret:
        return None
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    masked = urlunsplit((parts.scheme, netloc if parts.password is not None else parts.netloc,
                         parts.path, "password=***" if parts.query else "", ""))  # fmt: skip
    return (
        f"the URL carries a password ({masked}), which would be written to the run's "
        f"settings.json, flow-run parameters, logs and W&B config; {instead}"
    )


def no_password(instead: str) -> Any:
    """A validator refusing a URL that carries a password (password_in)."""

    def check(value: str | None) -> str | None:
        problem = value and password_in(value, instead)
        if problem:
            raise ValueError(problem)
        return value

    return check


PGPASSWORD_INSTEAD = (
    "leave it out of the URL and set PGPASSWORD (or ~/.pgpass) where the sweep and its "
    "workers run: psycopg reads them"
)


# A local folder, or the URL of a prepared dataset in an object store (scheme://...), whose
# credentials come from the environment, never from the URL.
STORE_CREDENTIALS = (
    "leave credentials out of it: the store's own variables (AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) are read where the run goes"
)


def _folder_or_url(value: Any) -> str | Path | None:
    if value is None or isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a folder or a URL, got {value!r}")
    if "://" in value:
        problem = password_in(value, STORE_CREDENTIALS)
        if problem:
            raise ValueError(problem)
        return value
    return Path(value)


FolderOrURL = Annotated[str | Path | None, BeforeValidator(_folder_or_url)]

# An optional path that env, .env and flags can clear: an empty value is None.
OptionalPath = Annotated[Path | None, BeforeValidator(lambda v: None if v == "" else v)]


def list_value(value: Any, example: str) -> Any:
    """A list setting as any source gives it: '1,2,2,2' or JSON '[1, 2, 2, 2]' (env, .env,
    flags, overrides alike), one value, or a list.

    Raises:
        ValueError: for text that is neither, naming the forms with `example`.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return [item.strip() for item in text.split(",") if item.strip()]
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"give a list as {example}, got {value!r}") from None
    return value if isinstance(value, (list, tuple)) else [value]


def env_name(field: str) -> str:
    """'optim.lr' -> 'DDPM_OPTIM__LR'."""
    return ENV_PREFIX + field.upper().replace(".", ENV_DELIMITER)


def setting_name(env_var: str) -> str:
    """'DDPM_OPTIM__LR' -> 'optim.lr' (the inverse of env_name)."""
    return env_var.removeprefix(ENV_PREFIX).lower().replace(ENV_DELIMITER, ".")


def flag_name(field: str) -> str:
    """'optim.lr' -> '--optim.lr'."""
    return f"--{field}"
