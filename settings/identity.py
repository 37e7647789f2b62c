"""A run's identity: which settings change the trained weights, and so name the run.

A run's folder is `run.dir / run_name(settings)`: `run.name`, or 'run-' + a hash of the settings
that change what a run computes. Where things live, how a run is watched and how fast it goes
do not name it; a setting added after runs existed names a run only when it leaves what every
run had before it, so older runs keep their names.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ddpm.config import LEGACY_DIFFUSION
from settings.config import Settings
from settings.loading import flatten

# Settings that do not change what a run computes. Everything else names the run.
NOT_RESULT_PREFIXES = ("sample.", "eval.", "run.", "wandb.", "sweep.")
NOT_RESULT = {
    "data.root",
    "data.url",
    "data.num_workers",
    "data.loader",
    "data.prepare",  # the same images either way (tests/ddpm/test_prepare.py)
    "train.device",
    "train.log_every",
    "train.max_bad_steps",
    "train.precision",
    "train.compile",
    "train.devices",
    "train.rank_timeout",
    "train.max_restarts",
    "train.accumulate",
    "model.checkpointing",
}

_DDPM_ONLY = ("channel_mult", "num_res_blocks", "attention_resolutions", "dropout")
_EDM_ONLY = ("sigma_data", "p_mean", "p_std")
_DISCRETE_ONLY = ("num_timesteps", "beta_start", "beta_end", "schedule", "prediction",
                  "loss_weighting", "min_snr_gamma")  # fmt: skip


# (the settings, the condition under which they name the run, the condition in words)
Rule = tuple[tuple[str, ...], Callable[[Settings], bool], str]


def _unlike_legacy(field: str, value: Any) -> Rule:
    return (
        (f"diffusion.{field}",),
        lambda s: getattr(s.diffusion, field) != value,
        f"when not {value} (what every run had before the setting)",
    )


# Settings that name the run only under a condition, which must hold for each rule naming them.
ONLY_WHEN: tuple[Rule, ...] = (
    (("train.epochs",), lambda s: s.optim.schedule == "cosine",
     "with optim.schedule=cosine, whose decay depends on the run's length"),
    (("model.arch", *(f"model.{k}" for k in _DDPM_ONLY)), lambda s: s.model.arch != "assignment",
     "with model.arch=ddpm"),
    *(_unlike_legacy(field, value) for field, value in LEGACY_DIFFUSION.items()),
    (("diffusion.min_snr_gamma",), lambda s: s.diffusion.loss_weighting == "min_snr",
     "with diffusion.loss_weighting=min_snr"),
    (("model.init_from",), lambda s: s.model.init_from is not None, "when set"),
    (("train.ema_snapshots",), lambda s: bool(s.train.ema_snapshots), "when not 0"),
    (("model.augment_labels",), lambda s: s.model.augment_labels, "when true"),
    (("diffusion.beta_start", "diffusion.beta_end"), lambda s: s.diffusion.schedule == "linear",
     "with diffusion.schedule=linear"),
    (tuple(f"diffusion.{k}" for k in _EDM_ONLY), lambda s: s.diffusion.formulation == "edm",
     "with diffusion.formulation=edm"),
    (tuple(f"diffusion.{k}" for k in _DISCRETE_ONLY),
     lambda s: s.diffusion.formulation == "discrete", "with diffusion.formulation=discrete"),
)  # fmt: skip


def changes_result(key: str) -> bool:
    """Whether the dotted setting can change the trained weights (and so the run's name)."""
    return key not in NOT_RESULT and not key.startswith(NOT_RESULT_PREFIXES)


def names_run(key: str) -> str:
    """When the dotted setting names the run, in words: 'no', 'yes' or 'with ...'."""
    if not changes_result(key):
        return "no"
    when = [words for keys, _, words in ONLY_WHEN if key in keys]
    return "; ".join(when) if when else "yes"


def result_settings(settings: Settings) -> dict[str, Any]:
    """The dotted settings that change the trained weights, as JSON values."""
    flat = flatten(settings.model_dump(mode="json"))
    return {
        key: value
        for key, value in flat.items()
        if changes_result(key)
        and all(holds(settings) for keys, holds, _ in ONLY_WHEN if key in keys)
    }


def with_legacy(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A run's saved settings (nested, as settings.json or a checkpoint holds them), with the
    diffusion settings it was trained with filled in where it predates them (LEGACY_DIFFUSION)."""
    nested = {k: dict(v) if isinstance(v, Mapping) else v for k, v in saved.items()}
    nested["diffusion"] = {**LEGACY_DIFFUSION, **nested.get("diffusion", {})}
    return nested


def run_name(settings: Settings) -> str:
    """run.name, or 'run-' + a 10-hex-digit hash of the result-changing settings, and
    '-from-' + the folder's name for a run that starts from model.init_from."""
    if settings.run.name:
        return settings.run.name
    blob = json.dumps(result_settings(settings), sort_keys=True).encode()
    name = "run-" + hashlib.sha256(blob).hexdigest()[:10]
    start = settings.model.init_from
    return f"{name}-from-{re.sub(r'[^A-Za-z0-9._-]+', '-', start.name)[:60]}" if start else name


def run_path(settings: Settings) -> Path:
    """run.dir / run_name: the folder holding the run's settings, checkpoints and samples."""
    return Path(settings.run.dir) / run_name(settings)


def result_changes(saved: Mapping[str, Any], settings: Settings) -> list[str]:
    """'key: old -> new' for each result-changing setting that differs from a saved run's
    (a saved settings.json, nested as model_dump(mode='json') writes it)."""
    old, new = flatten(with_legacy(saved)), result_settings(settings)
    return [
        f"{key}: {old.get(key)!r} -> {value!r}"
        for key, value in new.items()
        if old.get(key) != value
    ]
