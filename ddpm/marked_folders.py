"""Folders a command writes whole and replaces whole (an export): a marker file in the folder
lists every file under it with its SHA-256 (write_marker), so that the next run tells a folder
the command wrote, unchanged, from one holding a user's files or edits (check_replaceable), and
deletes only what it wrote (remove_listed). The product never deletes or replaces a user's files
(ddpm.files.claim_folder is the same rule for folders written into file by file).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

from ddpm.files import DamagedFile, NotOurs, read_json, write_json

EXPORT_MARKER = ".ddpm-export.json"  # in every folder ddpm-export wrote (ddpm.export)


def check_replaceable(folder: Path, marker: str, writer: str, option: str) -> None:
    """Check that `folder` may be replaced as a whole: it does not exist, it is empty, or
    `writer` wrote it and it is as written (its `marker` lists every file under it with its
    SHA-256, and each matches).

    Args:
        writer: the command that writes such folders, and option the flag naming the folder,
            for the message.

    Raises:
        NotOurs: naming the folder and the first file that is not `writer`'s, or changed.
    """
    folder = Path(folder)
    fix = f"choose another {option}, or empty the folder yourself"
    if not folder.exists():
        return
    if not folder.is_dir():
        raise NotOurs(f"{folder} ({option}) is a file, not a folder; choose another {option}")
    if not any(folder.iterdir()):
        return
    try:
        listed = read_json(folder / marker, fix).get("files")
    except FileNotFoundError:
        listed = None
    except DamagedFile as err:
        raise NotOurs(f"{folder} ({option}) is not a verifiable {writer} folder: {err}") from None
    if not isinstance(listed, dict):
        names = ", ".join(sorted(p.name for p in folder.iterdir())[:3])
        raise NotOurs(
            f"{folder} ({option}) holds files that {writer} did not write ({names}); they are "
            f"left as they are: {fix}"
        )
    for file in _files(folder):
        name = file.relative_to(folder).as_posix()
        if name == marker:
            continue
        if name not in listed:
            why = f"that {writer} did not write"
        elif sha256_of(file) != listed[name]:
            why = f"changed since {writer} wrote it"
        else:
            continue
        raise NotOurs(
            f"{folder} ({option}) was written by {writer}, but it holds {name}, {why}; nothing "
            f"was replaced: {fix}"
        )


def check_export_target(out: Path) -> None:
    """Check that ddpm-export may write `out` (check_replaceable): absent, empty, or an earlier
    export whose files are all as the export wrote them, and nothing else.

    Raises:
        NotOurs: naming the folder and the first file that is not the export's, or changed.
    """
    check_replaceable(Path(out), EXPORT_MARKER, "ddpm-export", "--out")


def write_marker(folder: Path, marker: str, writer: str) -> None:
    """Write `marker` in folder: every file under it with its SHA-256 (check_replaceable)."""
    files = {p.relative_to(folder).as_posix(): sha256_of(p) for p in _files(folder)}
    write_json(folder / marker, {"files": files, "written_by": writer})


def remove_listed(folder: Path, marker: str) -> bool:
    """Delete the files `marker` lists in folder, the marker, then the folders left empty;
    returns whether folder itself is gone (False: it held something else, which is kept)."""
    listed: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, DamagedFile):
        listed = read_json(folder / marker, "").get("files") or {}
    for name in [*listed, marker]:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def _files(folder: Path) -> list[Path]:
    """Every file under folder, sorted (a symlink counts as a file, never followed)."""
    return sorted(p for p in folder.rglob("*") if p.is_symlink() or not p.is_dir())


def sha256_of(path: Path) -> str:
    """The file's SHA-256 (hex); 'symlink' for a symlink, which is never followed."""
    if path.is_symlink():
        return "symlink"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
