"""The settings reference, generated from the pydantic models (the docs site's
reference/settings.md, written at build time by docs/hooks.py; `python -m settings.reference`
prints it): every setting's env variable, flag, type, default, bounds, description, and when it
names the run (settings.identity)."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from settings.config import Settings
from settings.fields import env_name, flag_name
from settings.identity import names_run
from settings.sampling import GenerateOptions

_BOUNDS = ((at.Ge, "ge", "≥"), (at.Gt, "gt", ">"), (at.Le, "le", "≤"), (at.Lt, "lt", "<"),
           (at.MinLen, "min_length", "items ≥"), (at.MaxLen, "max_length", "items ≤"))  # fmt: skip


def type_name(annotation: Any) -> str:
    """A field's type as a reader would write it: 'int', 'cifar10 | folder', 'list of int'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        shown = [type_name(a) for a in args if a is not type(None)]
        kept = list(dict.fromkeys("path" if s in ("str", "path") and len(shown) > 1 else s
                                  for s in shown))  # fmt: skip
        return " or ".join(kept) + (" (optional)" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field: FieldInfo) -> str:
    """The field's numeric and length bounds and pattern: '≥ 32, ≤ 1024'."""
    shown = []
    for item in field.metadata:
        for kind, attribute, sign in _BOUNDS:
            if isinstance(item, kind):
                shown.append(f"{sign} {getattr(item, attribute):,}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            shown.append(f"`{pattern}`")
    return ", ".join(shown)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "`" + ", ".join(str(v) for v in value) + "`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def settings_table(group: str, model: type[BaseModel]) -> list[str]:
    """One group's rows: setting, env and flag, type, default, bounds, names the run, meaning."""
    rows = ["| setting | env / flag | type | default | bounds | names the run | description |",
            "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, field in model.model_fields.items():
        key = f"{group}.{name}"
        rows.append(
            f"| `{key}` | `{env_name(key)}`<br>`{flag_name(key)}` | {type_name(field.annotation)}"
            f" | {_default(field)} | {_cell(bounds(field))} | {_cell(names_run(key))}"
            f" | {_cell(field.description or '')} |"
        )
    return rows


def options_table(model: type[BaseModel]) -> list[str]:
    """ddpm-sample's options: flag, type, default, bounds, meaning."""
    rows = ["| flag | type | default | bounds | description |", "| --- | --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            flag = f"--no-{name}" if field.default else flag
        rows.append(f"| `{flag}` | {type_name(field.annotation)} | {_default(field)} | "
                    f"{_cell(bounds(field))} | {_cell(field.description or '')} |")  # fmt: skip
    return rows


def settings_reference() -> str:
    """The whole reference page, as Markdown."""
    out = [
        "# Settings reference",
        "",
        "Generated from the pydantic models in `settings/` when the site is built. Each setting",
        'is given, highest precedence first, as a flow override (`{"optim.lr": 2e-4}`), a flag',
        "(`--optim.lr 2e-4`), an environment variable (`DDPM_OPTIM__LR=2e-4`) or a line of `.env`",
        "([Settings](../concepts/settings.md)). *Names the run*: whether the setting changes",
        "the trained weights and so the run's folder name ([Runs](../concepts/runs.md)).",
    ]
    for group, info in Settings.model_fields.items():
        model = info.annotation
        doc = " ".join((model.__doc__ or "").split())
        out += ["", f"## `{group}`", "", doc, "", *settings_table(group, model)]
    doc = " ".join((GenerateOptions.__doc__ or "").split())
    out += ["", "## `ddpm-sample` options", "", f"{doc} Unset sampler options take the run's "
            "own `sample.*` settings.", "", *options_table(GenerateOptions)]  # fmt: skip
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(settings_reference(), end="")
