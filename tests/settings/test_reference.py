"""The settings reference (the docs' reference/settings.md) is generated from the models, so it
shows what the code does: each setting's env variable, flag and default as loaded, its bounds as
validated, and whether it names the run as run_name computes it."""

from __future__ import annotations

import re
from typing import Any

import pytest

from settings import load_settings, run_name
from settings.fields import env_name, flag_name
from settings.identity import names_run, result_settings
from settings.loading import flatten, known_settings
from settings.reference import settings_reference

# Settings that turn on every conditional rule of settings.identity.ONLY_WHEN at once, and the
# other side of each rule.
ALL_ON = {"optim.schedule": "cosine", "model.arch": "ddpm", "diffusion.schedule": "linear",
          "diffusion.loss_weighting": "min_snr", "train.ema_snapshots": 4,
          "model.augment_labels": True}  # fmt: skip
EDM = {"diffusion.formulation": "edm"}


def _rows() -> dict[str, list[str]]:
    rows = {}
    for line in settings_reference().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0].startswith("`") and "." in cells[0]:
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_setting_has_one_row_with_its_env_variable_and_flag() -> None:
    rows = _rows()
    assert set(rows) >= set(known_settings())
    for key in known_settings():
        assert rows[key][1] == f"`{env_name(key)}`<br>`{flag_name(key)}`"


def test_each_default_shown_is_the_default_loaded() -> None:
    """The default column is the value a run gets with nothing set (unset for None)."""
    loaded = flatten(load_settings(env_file=None).model_dump(mode="json"))
    rows = _rows()
    for key in known_settings():
        value: Any = loaded[key]
        if value is None:
            shown = "unset"
        elif isinstance(value, bool):
            shown = str(value).lower()
        elif isinstance(value, list):
            shown = "`" + ", ".join(map(str, value)) + "`"
        else:
            shown = f"`{value}`"
        assert rows[key][3] == shown, key


def test_bounds_shown_are_the_fields_constraints() -> None:
    rows = _rows()
    assert rows["data.image_size"][4] == "≥ 32, ≤ 1,024"
    assert rows["optim.lr"][4] == "> 0, ≤ 10"
    assert rows["model.channel_mult"][4] == "items ≥ 1, items ≤ 8"
    assert rows["run.name"][4] == "`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`"


@pytest.mark.parametrize("key", known_settings())
def test_names_the_run_says_what_run_name_does(key: str) -> None:
    """'no': the setting is never among the result-changing settings; 'yes': always; a
    condition: in them with the condition on, out with it off."""
    cases = [load_settings(over, env_file=None) for over in ({}, ALL_ON, EDM, {**ALL_ON, **EDM})]
    present = [key in result_settings(s) for s in cases]
    words = names_run(key)
    assert words == _rows()[key][5]
    if key == "model.init_from":  # set, it names a folder on disk: tests/ddpm/test_export.py
        assert words == "when set" and not any(present)
    elif words == "no":
        assert not any(present)
    elif words == "yes":
        assert all(present)
    else:
        assert any(present) and not all(present), (words, present)


def test_a_setting_that_names_the_run_changes_its_name_and_one_that_does_not_keeps_it() -> None:
    base = run_name(load_settings(env_file=None))
    assert run_name(load_settings({"optim.lr": 1e-4}, env_file=None)) != base
    assert run_name(load_settings({"train.log_every": 7}, env_file=None)) == base
    assert run_name(load_settings({"train.epochs": 7}, env_file=None)) == base
    cosine = run_name(load_settings({"optim.schedule": "cosine"}, env_file=None))
    assert run_name(load_settings({"optim.schedule": "cosine", "train.epochs": 7})) != cosine
