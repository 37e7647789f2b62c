"""The commands' flags: one parser per command, built without importing torch or Prefect, so
that `--help` and a bad flag answer at once (flows.cli runs the commands; the docs' commands
reference is generated from these parsers)."""

from __future__ import annotations

import argparse
from typing import Any

from settings import SettingsError, parse_flags
from settings.fields import flag_name
from settings.loading import did_you_mean, known_settings, one_line
from settings.sampling import GenerateOptions, OptionsError, flag, generate_options

PROG = "python flows/train_flow.py"
SAMPLE_PROG = "python flows/sample_flow.py"
EXPORT_PROG = "python flows/export_flow.py"
EMA_PROG = "ddpm-ema"
PREPARE_PROG = "ddpm-prepare"
SWEEP_PROG = "ddpm-sweep"
# The settings sample_flow takes besides its options: how to evaluate, and how the command runs.
SAMPLE_SETTINGS = ("eval.", "run.stop_timeout", "run.server_timeout", "run.debug")


def _parser(prog: str, description: str, **options: Any) -> argparse.ArgumentParser:
    """A command's parser: no abbreviated flags (`--out` is never taken for `--outt`);
    `options` go to argparse.ArgumentParser (an epilog, a formatter_class)."""
    return argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, description=description, **options
    )


def export_parser() -> argparse.ArgumentParser:
    """`ddpm-export --run PATH --out DIR [--no-ema]`."""
    parser = _parser(
        EXPORT_PROG,
        "Write a trained run as a folder diffusers' DDPMPipeline.from_pretrained "
        "loads (safetensors, scheduler config, model card).",
    )
    parser.add_argument("--run", required=True, help="a run folder or a checkpoint (best.pt)")
    parser.add_argument(
        "--out",
        required=True,
        help="the folder to write: new, empty, or an earlier export (replaced)",
    )
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="the trained weights instead of their EMA")  # fmt: skip
    return parser


def ema_parser() -> argparse.ArgumentParser:
    """`ddpm-ema --run RUN --sigma-rel 0.05,0.10`."""
    parser = _parser(
        EMA_PROG,
        "Rebuild EMA lengths of a run trained with train.ema_snapshots (EDM2's "
        "post-hoc EMA) as checkpoints in RUN/ema/.",
    )
    parser.add_argument("--run", required=True, help="a run folder")
    parser.add_argument(
        "--sigma-rel", required=True, help="EMA lengths, each in (0, 0.288), e.g. 0.05,0.1"
    )
    return parser


def prepare_parser() -> argparse.ArgumentParser:
    """`ddpm-prepare --source SOURCE --out OUT --image-size N`."""
    parser = _parser(
        PREPARE_PROG,
        "Decode, convert, resize and crop a dataset once into a prepared dataset "
        "that --data.dataset prepared --data.folder OUT trains from at memory speed.",
    )
    parser.add_argument("--source", required=True, help="an image folder, a folder holding "
                        "CIFAR-10's python batches, or a Hugging Face dataset on disk "
                        "(save_to_disk's folder or a folder of parquet files)")  # fmt: skip
    parser.add_argument("--out", required=True, help="the prepared dataset's folder: new, "
                        "empty, or an earlier preparation (continued or replaced)")  # fmt: skip
    parser.add_argument("--image-size", default="32", help="side in px, a multiple of 32 "
                        "(default 32)")  # fmt: skip
    parser.add_argument("--channels", default="3", choices=["1", "3"], help="3 RGB, 1 grayscale")
    parser.add_argument("--column", help="a Hugging Face dataset's image column (default: its "
                        "first Image column)")  # fmt: skip
    parser.add_argument("--workers", help="processes decoding at once (default: every CPU)")
    parser.add_argument("--shard-size", default="4096", help="images per file (default 4096)")
    return parser


SWEEP_EXAMPLE = """\
name: lr-width                      # runs/sweeps/lr-width, W&B group lr-width
deployment: train-flow/ddpm-smoke   # what each trial runs
metric: epoch/loss                  # or eval/fid, eval/kid (trials that evaluate)
goal: minimize
search: grid                        # grid | random | tpe
concurrency: 2                      # trials running at once
base: {train.epochs: 2}             # overrides every trial gets
vary:
  optim.lr: [1.0e-3, 2.0e-4]        # a list: the choices
  model.hidden_size: [16, 32]
"""


def sweep_parser() -> argparse.ArgumentParser:
    """`ddpm-sweep --spec sweep.yaml`; its help shows an example spec (SWEEP_EXAMPLE)."""
    parser = _parser(
        SWEEP_PROG,
        "Run many trials of one spec (train-flow runs, or sample-flow runs that "
        "score trained runs)\nthrough a Prefect deployment, at most `concurrency` at once, and "
        "compare them\n(table artifact, plot, W&B group). Re-running it continues it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the spec's lines as they are
        epilog="An example spec (4 tiny trials, 2 at a time):\n\n"
        + "".join(f"  {line}\n" for line in SWEEP_EXAMPLE.splitlines())
        + "\nMore in deployments/sweeps/ (a grid, a TPE search, trials that draw and score "
        "images);\nevery key in docs/how-to/sweeps.md. The deployment must be served first: "
        "ddpm-serve.",
    )
    parser.add_argument("--spec", required=True, help="the sweep's YAML spec")
    return parser


def sample_parser() -> argparse.ArgumentParser:
    """`ddpm-sample`'s options (GenerateOptions); its settings flags are parsed apart."""
    parser = argparse.ArgumentParser(
        prog=SAMPLE_PROG,
        allow_abbrev=False,
        description="Draw images from a trained run; optionally score them (FID, KID).",
        epilog="Settings flags: --eval.weights PATH, --eval.batch_size N, --eval.metrics "
        "fid,kid, --eval.cache_dir DIR, --run.debug true (env: DDPM_EVAL__WEIGHTS, ...; see "
        f"{PROG} --help). The run's data, model and sampler settings come from its checkpoint.",
    )
    for name, field in GenerateOptions.model_fields.items():
        if field.annotation is bool:  # --no-ema stores False, --npz True
            action = "store_false" if field.default else "store_true"
            parser.add_argument(
                flag(name),
                dest=name,
                action=action,
                default=argparse.SUPPRESS,
                help=field.description,
            )
        else:
            parser.add_argument(
                flag(name),
                dest=name,
                required=field.is_required(),
                default=argparse.SUPPRESS,
                metavar=name.upper(),
                help=field.description,
            )
    return parser


def parse_command(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parser.parse_args, where an unknown flag ends the command first (exit 2), with one
    line that names it and the closest known flag ("did you mean --out?")."""
    unknown = unknown_flag(argv, _flags(parser), _valued(parser))
    if unknown:
        parser.exit(2, f"{parser.prog}: error: {unknown}\n")
    return parser.parse_args(argv)


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings]


def _valued(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's flags that take a value (the word after one is never a flag)."""
    return [f for action in parser._actions if action.nargs != 0 for f in action.option_strings]


def unknown_flag(argv: list[str], known: list[str], valued: list[str]) -> str | None:
    """'unknown flag --outt; did you mean --out? (see --help)' for the first flag in argv that
    is not among `known`, else None. The word after a flag among `valued` (given without
    `=`) is its value, whatever it looks like (`--seed -1`)."""
    value_next = False
    for arg in argv:
        name = arg.partition("=")[0]
        if value_next:
            value_next = False
            continue
        if name.startswith("-") and name != "-" and name not in known:
            return one_line(f"unknown flag {name}{did_you_mean(name, known)} (see --help)")
        value_next = name in valued and "=" not in arg
    return None


def parse_sample_args(argv: list[str]) -> tuple[GenerateOptions, dict[str, Any]]:
    """sample_flow's options (validated) and its settings flags (eval.*,
    run.debug, run.stop_timeout, run.server_timeout) as dotted overrides.

    Raises:
        OptionsError, SettingsError: naming the bad flag.
    """
    parser = sample_parser()
    settings = {flag_name(f): f for f in known_settings()}
    ours = [flag for flag, field in settings.items() if field.startswith(SAMPLE_SETTINGS)]
    for arg in argv:  # another command's setting is named as such, not as a misspelling
        name = arg.partition("=")[0]
        if name in settings and name not in ours:
            raise SettingsError([(settings[name], "not a setting of sample_flow (see --help)")])
    unknown = unknown_flag(argv, [*_flags(parser), *ours], [*_valued(parser), *ours])
    if unknown:
        raise OptionsError(unknown)
    try:
        known, rest = parser.parse_known_args(argv)
    except SystemExit as exit_:
        if exit_.code == 0:  # --help
            raise
        raise OptionsError("see the usage above") from None
    overrides = parse_flags(rest, prog=SAMPLE_PROG) if rest else {}
    return generate_options(vars(known)), overrides


# The seven commands: (command, the same as, the flow it runs, its deployment, what it does)
COMMANDS = (
    ("ddpm-train", "python flows/train_flow.py", "train-flow", "ddpm-cifar10, ddpm-smoke",
     "train a run, or resume it ([Runs](../concepts/runs.md))"),
    ("ddpm-sample", "python flows/sample_flow.py", "sample-flow", "ddpm-sample",
     "images from a trained run, and their FID and KID ([Generate](../how-to/generate.md))"),
    ("ddpm-export", "python flows/export_flow.py", "export-flow", "ddpm-export",
     "a run as a diffusers folder ([Export](../how-to/export.md))"),
    ("ddpm-sweep", "python flows/sweep_flow.py", "sweep-flow", "ddpm-sweep",
     "many runs of one spec, compared ([Sweeps](../how-to/sweeps.md))"),
    ("ddpm-ema", "python flows/ema_flow.py", "ema-flow", "ddpm-ema",
     "EMA lengths rebuilt after training ([EDM](../concepts/formulations.md#edm))"),
    ("ddpm-prepare", "python flows/prepare_flow.py", "prepare-flow", "ddpm-prepare",
     "a dataset decoded once ([Your own images](../getting-started/own-images.md))"),
    ("ddpm-serve", "python deployments/serve.py", "(all of the above)", "(serves them)",
     "the deployments served from one process ([Deployments](../how-to/deployments.md))"),
)  # fmt: skip
PARSERS = {
    "ddpm-sample": sample_parser,
    "ddpm-export": export_parser,
    "ddpm-sweep": sweep_parser,
    "ddpm-ema": ema_parser,
    "ddpm-prepare": prepare_parser,
}


def commands_reference() -> str:
    """The docs' commands reference (reference/commands.md), generated from the parsers."""
    out = [
        "# Commands",
        "",
        "`pip install -e .` puts these on the virtual environment's path; each answers `--help`",
        "at once (before torch and Prefect are imported). Generated from the parsers in",
        "`flows/commands.py` when the site is built.",
        "",
        "| command | the same as | flow | deployment | what |",
        "| --- | --- | --- | --- | --- |",
        *(f"| `{c}` | `{same}` | `{f}` | {d} | {what} |" for c, same, f, d, what in COMMANDS),
        "",
        "## `ddpm-train`",
        "",
        "Its flags are the settings, `--group.field value`: see the "
        "[settings reference](settings.md). `ddpm-train --help` lists them.",
    ]
    for command, build in PARSERS.items():
        parser = build()
        parser.prog = command
        parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=96)
        out += ["", f"## `{command}`", "", "```text", parser.format_help().rstrip(), "```"]
    return "\n".join(out) + "\n"
