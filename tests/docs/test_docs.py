"""The documentation: the site builds under `mkdocs build --strict` with its reference pages
generated from the code, the README stays a landing page whose links resolve, and every command
the pages and the README show is one the commands accept."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_run import write_cifar10

from flows.commands import PARSERS, parse_command, parse_sample_args
from settings import SettingsError, load_settings, parse_flags
from settings.fields import env_name
from settings.loading import known_settings
from settings.sampling import OptionsError

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PAGES = [*sorted((REPO / "docs").rglob("*.md")), REPO / "README.md"]
COMMAND = re.compile(r"(?:^|/)(?:ddpm-(train|sample|export|sweep|ema|prepare|serve)"
                     r"|flows/(train|sample|export|sweep|ema|prepare)_flow\.py)$")  # fmt: skip
# Settings that name a path of the reader's (~/pictures/faces): the documented command is
# right when only these are refused, as missing.
PATH_SETTINGS = {"data.folder", "model.init_from", "eval.weights"}


def test_the_site_builds_strict_with_its_reference_generated_from_the_code(
    tmp_path: Path,
) -> None:
    """`mkdocs build --strict` (a broken link or anchor, a page left out of the nav or a
    docstring griffe cannot read fails it) writes the site, whose settings page lists every
    setting with its env variable, and whose commands page holds each command's flags."""
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(BIN), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    settings_page = (tmp_path / "reference" / "settings" / "index.html").read_text()
    missing = [k for k in known_settings() if env_name(k) not in settings_page]
    assert not missing, missing
    commands_page = (tmp_path / "reference" / "commands" / "index.html").read_text()
    for build in PARSERS.values():
        for action in build()._actions:
            for flag in action.option_strings:
                assert flag in commands_page, flag
    api_page = (tmp_path / "reference" / "api" / "index.html").read_text()
    assert 'id="ddpm.diffusion.DiffusionModel"' in api_page


def test_the_readme_is_a_landing_page_whose_links_resolve() -> None:
    """README.md is at most 200 lines, holds the test command `.ci/run` reads, and each of its
    relative links names a file of the repository (GitHub shows the docs pages there)."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "<!-- test-command -->" in text
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"https?://", link)]
    assert len(local) >= 20, local
    broken = [link for link in local if not (REPO / link).exists()]
    assert not broken, broken


def documented_commands() -> Iterator[tuple[str, str, list[str]]]:
    """(page, command, arguments) for each command in the bash blocks of the docs and README."""
    for page in PAGES:
        blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
                lexer.whitespace_split, lexer.commenters = True, "#"
                words: list[str] = []
                for word in [*lexer, ";"]:
                    if word and set(word) <= set("&|;"):
                        yield from _command(page, words)
                        words = []
                    else:
                        words.append(word)


def _command(page: Path, words: list[str]) -> Iterator[tuple[str, str, list[str]]]:
    name = str(page.relative_to(REPO))
    if words[:1] and Path(words[0]).name == "prefect" and words[1:3] == ["deployment", "run"]:
        yield name, "deployment", words  # before its name, e.g. 'sample-flow/ddpm-sample'
        return
    for i, word in enumerate(words):
        match = COMMAND.search(word)
        if match:
            yield name, match[1] or match[2], words[i + 1 :]
            return


def _check_train(args: list[str]) -> None:
    _check_overrides(parse_flags(args))


def _check_overrides(overrides: dict) -> None:
    try:
        load_settings(overrides, env_file=None)
    except SettingsError as err:
        assert set(err.fields) <= PATH_SETTINGS, str(err)


def _check_sample(args: list[str]) -> None:
    try:
        parse_sample_args(args)
    except OptionsError as err:  # the reader's run folder, runs/<name>
        assert all("--run" in line and "no such" in line for line in str(err).splitlines())


def _check_deployment(words: list[str]) -> None:
    """A deployment run's `overrides` are settings; sample-flow's `options` are ddpm-sample's."""
    for flag, value in itertools.pairwise(words):
        if flag == "--params":
            _check_overrides(json.loads(value).get("overrides", {}))
        if flag == "--param" and value.startswith("options="):
            options = json.loads(value.removeprefix("options="))
            _check_sample([w for k, v in options.items() for w in _as_flags(k, v)])


def _as_flags(key: str, value: object) -> list[str]:
    flag = "--" + key.replace("_", "-")
    return [flag] if value is True else [flag, str(value)]


def test_every_documented_command_takes_the_flags_it_is_shown_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each `ddpm-*`, `python flows/*_flow.py`, `torchrun ... flows/train_flow.py` and `prefect
    deployment run` line of the docs and the README parses with the command's own parser: no
    unknown or misspelt flag, no value the settings refuse (a path of the reader's aside)."""
    monkeypatch.chdir(tmp_path)  # the docs' relative paths name nothing here
    for key in [k for k in os.environ if k.startswith("DDPM_")]:
        monkeypatch.delenv(key)
    seen: dict[str, int] = {}
    for page, command, args in documented_commands():
        seen[command] = seen.get(command, 0) + 1
        try:
            if command == "train":
                _check_train(args)
            elif command == "sample":
                _check_sample(args)
            elif command == "deployment":
                _check_deployment(args)
            elif command != "serve":
                parse_command(PARSERS[f"ddpm-{command}"](), args)
        except (AssertionError, SettingsError, OptionsError, SystemExit) as err:
            pytest.fail(f"{page}: {command} {shlex.join(args)}: {err}")
    assert seen.get("train", 0) >= 10 and len(seen) >= 7, seen


@pytest.mark.slow(seconds=15)
@pytest.mark.parametrize("command", ["ddpm-train", "ddpm-sample", "ddpm-export", "ddpm-sweep",
                                     "ddpm-ema", "ddpm-prepare", "ddpm-serve"])  # fmt: skip
def test_each_command_the_docs_name_is_installed_and_answers_help(command: str) -> None:
    """The seven commands of the README's table run, as installed, and print their usage."""
    done = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


@pytest.mark.slow(seconds=90)
def test_the_core_pages_python_runs_as_shown(tmp_path: Path) -> None:
    """The Python of "Use the core directly", each block as shown in a fresh process, in a folder
    whose ./data holds a CIFAR-10 of 1,025 images in the official format (nothing is downloaded
    here): both end, and the whole run leaves its two epochs' checkpoints and grids."""
    text = (REPO / "docs" / "how-to" / "core.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    write_cifar10(tmp_path / "data", images_per_batch=205)
    for block in blocks:
        done = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "notebook"
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [
        "epoch_001.png", "epoch_002.png"
    ]  # fmt: skip
    assert len(list((run / "checkpoints").glob("epoch_*.pt"))) == 2


def test_the_architecture_page_names_every_module() -> None:
    """docs/concepts/architecture.md matches the tree: each module of ddpm/, flows/ (and its
    sweep package) and settings/ is named on it."""
    page = (REPO / "docs" / "concepts" / "architecture.md").read_text()
    modules = [
        p for package in ("ddpm", "flows", "settings") for p in (REPO / package).rglob("*.py")
    ]
    missing = [str(p.relative_to(REPO)) for p in modules
               if p.name != "__init__.py" and p.name not in page]  # fmt: skip
    assert len(modules) > 60 and not missing, missing
