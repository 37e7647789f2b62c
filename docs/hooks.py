"""MkDocs hook: the reference pages are generated at build time, so they cannot drift from
the code: the settings (reference/settings.md) from the pydantic models (settings.reference),
the commands (reference/commands.md) from their parsers (flows.commands), and the core's API
(reference/api.md) from every module of ddpm/, rendered by mkdocstrings from the docstrings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

from flows.commands import commands_reference
from settings.reference import settings_reference

# The reading order of the core's API page: the math first, then training, data, files, output;
# a module not named here comes last, so that every module of ddpm/ is on the page.
API_ORDER = ("diffusion", "schedules", "samplers", "sigma_samplers", "edm", "noise", "unet",
             "ddpm_unet", "compiled_network", "config", "build", "training", "trainer",
             "group_training", "distributed", "datasets", "batches", "cifar10", "image_folders",
             "prepare", "sources", "prepared", "checkpoint", "run_dir", "files", "marked_folders",
             "generate", "images", "evaluation", "phema", "posthoc", "diffusers_format",
             "diffusers_configs", "export", "errors")  # fmt: skip


def api_page() -> str:
    """reference/api.md: a mkdocstrings block for each module of ddpm/."""
    found = {p.stem for p in (Path(__file__).parents[1] / "ddpm").glob("*.py")} - {"__init__"}
    modules = [m for m in API_ORDER if m in found] + sorted(found - set(API_ORDER))
    head = [
        "# Core API (`ddpm`)",
        "",
        "Generated from the docstrings of `ddpm/`, the plain-PyTorch core (no Prefect, W&B",
        "or settings imports). Shapes are in the docstrings; see",
        "[Use the core directly](../how-to/core.md) for a whole run without Prefect.",
        "",
    ]
    return "\n".join(head + [f"::: ddpm.{m}\n" for m in modules])


def on_files(files: Files, config: Any) -> Files:
    """Add the generated pages to the site's files."""
    files.append(File.generated(config, "reference/settings.md", content=settings_reference()))
    files.append(File.generated(config, "reference/commands.md", content=commands_reference()))
    files.append(File.generated(config, "reference/api.md", content=api_page()))
    return files
