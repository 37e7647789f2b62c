"""The options of `python flows/sample_flow.py` (and of sample-flow's parameters), validated.

Unset sampler options (sampler, steps, eta) take the run's own sample.* settings, so images look
like the run's sample grids unless asked otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ddpm.errors import UserError
from ddpm.files import NotOurs, claim_samples_folder
from settings.config import Settings
from settings.identity import with_legacy
from settings.loading import flatten, load_settings, one_line


class OptionsError(UserError, ValueError):
    """Invalid sample_flow options; the message names each flag."""


class GenerateOptions(BaseModel):
    """What to draw, from which run, how, and where to."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    run: Path = Field(description="a run folder (its newest valid checkpoint) or a checkpoint")
    num: int = Field(ge=1, le=10_000_000, description="images to draw")
    out: Path = Field(description="folder for 000000.png, ...; a re-run resumes it")
    seed: int = Field(0, ge=0, lt=2**63, description="image i's noise comes from (seed, i)")
    sampler: (
        Literal["ddim", "dpmpp_2m", "ddpm", "euler", "heun", "dpmpp_2m_karras", "dpmpp_3m_karras"]
        | None
    ) = Field(
        None,
        description="ddim, dpmpp_2m or ddpm (discrete runs), euler, heun, dpmpp_2m_karras or "
        "dpmpp_3m_karras (any run); default: the run's sample.sampler",
    )
    steps: int | None = Field(
        None, ge=1, description="the sampler's steps (heun: 2 steps - 1 calls); default: the run's"
    )
    eta: float | None = Field(None, ge=0, le=1, description="DDIM noise; default: the run's")
    batch_size: int = Field(128, ge=1, le=65_536, description="images per sampling batch")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="auto, cpu, cuda or cuda:N"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on CUDA, fp32 on CPU"
    )
    ema: bool = Field(True, description="the EMA weights (off: the trained weights)")
    sigma_rel: float | None = Field(
        None,
        gt=0,
        lt=math.sqrt(1 / 12),
        description="the post-hoc EMA of this length instead, rebuilt from the run folder's "
        "ema/ snapshots (runs trained with train.ema_snapshots; ddpm-ema)",
    )
    npz: bool = Field(False, description="also write samples_NxHxWxC.npz (uint8 NHWC)")
    evaluate: bool = Field(False, description="then FID/KID against the run's training images")

    @field_validator("run")
    @classmethod
    def _run_exists(cls, v: Path) -> Path:
        if not v.exists():
            raise ValueError(f"no such run folder or checkpoint: {v}")
        return v

    @model_validator(mode="after")
    def _posthoc_of_a_run_folder(self) -> GenerateOptions:
        if self.sigma_rel is not None and not self.run.is_dir():
            raise ValueError(
                f"--sigma-rel: rebuilds an EMA from a run folder's snapshots; {self.run} is a "
                "file (give the run folder)"
            )
        if self.sigma_rel is not None and not self.ema:
            raise ValueError("--sigma-rel: an EMA length, so not with --no-ema")
        return self

    @field_validator("out")
    @classmethod
    def _out_is_ours(cls, v: Path) -> Path:
        try:
            claim_samples_folder(v)  # a folder of the user's is refused before anything runs
        except NotOurs as err:
            raise ValueError(str(err)) from None
        return v


def flag(field: str) -> str:
    """'batch_size' -> '--batch-size'; 'ema' -> '--no-ema' (it is on by default)."""
    return "--no-ema" if field == "ema" else "--" + field.replace("_", "-")


def generate_options(values: dict[str, Any]) -> GenerateOptions:
    """Validate option values (from flags or flow parameters).

    Raises:
        OptionsError: naming the flag of each bad value.
    """
    try:
        return GenerateOptions(**values)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = str(e["loc"][0]) if e["loc"] else ""
            message = e["msg"].removeprefix("Value error, ")
            said = e["type"] in ("missing", "value_error")  # a validator's message says it
            if not isinstance(e.get("input"), (dict, list)) and not said:
                message += f", got {e.get('input')!r}"
            lines.append(one_line(f"{flag(field)}: {message}" if field else message))
        if len(lines) == 1:  # one line, as the command line's last line
            raise OptionsError(f"invalid option {lines[0]}") from None
        raise OptionsError("invalid options:\n  " + "\n  ".join(lines)) from None


def sampling_settings(
    saved: Mapping[str, Any], options: GenerateOptions, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """The settings sample_flow works with: the run's own (data, model, diffusion, sample...:
    `saved`, as its checkpoint recorded them), the options' sampler, device and precision on
    top, and eval.* and run.* from overrides, the environment and .env as for any command.

    Raises:
        SettingsError: for invalid values (e.g. steps past diffusion.num_timesteps).
    """
    own = ("eval.", "run.", "wandb.")  # this command's, not the run's
    base = {k: v for k, v in flatten(with_legacy(saved)).items() if not k.startswith(own)}
    chosen: dict[str, Any] = {
        "train.device": options.device,
        "train.precision": options.precision,
        "sample.use_ema": options.ema,
    }
    for name in ("sampler", "steps", "eta"):
        if getattr(options, name) is not None:
            chosen[f"sample.{name}"] = getattr(options, name)
    return load_settings({**base, **chosen, **(overrides or {})})
