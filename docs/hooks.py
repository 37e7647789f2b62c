"""MkDocs hook: the settings reference (reference/settings.md) and the commands reference
(reference/commands.md) are generated at build time from the pydantic models
(settings.reference) and the commands' parsers (flows.commands), so they cannot drift from the
code."""

from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files

from flows.commands import commands_reference
from settings.reference import settings_reference


def on_files(files: Files, config: Any) -> Files:
    """Add the generated pages to the site's files."""
    files.append(File.generated(config, "reference/settings.md", content=settings_reference()))
    files.append(File.generated(config, "reference/commands.md", content=commands_reference()))
    return files
