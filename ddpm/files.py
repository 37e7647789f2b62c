"""Files the product writes and reads again, and the folders it writes into.

- Every file a later command reads is written atomically (atomic_write): readers see the old
  file or the whole new one, never a part, whatever kills the writer.
- A file that was damaged anyway (a disk fault, a hand edit, a copy cut short) is read with
  read_json, which names it and says what to do in one line (DamagedFile) instead of a
  traceback.
- An output folder a user names (an export, a sample folder, a sweep, a run) is written only
  when it is new, empty, or the product's own (claim_folder): the product never deletes or
  replaces a user's files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import IO, Any

from ddpm.errors import UserError


class DamagedFile(UserError):
    """A file the product wrote is damaged; the message names it and says what to do."""


class NotOurs(UserError):
    """An output folder holds files the product did not write; it is left as it was."""


class WriteError(UserError):
    """A file could not be written for a reason of the machine's that the user fixes (a full
    disk or quota, the file size limit, a read-only or forbidden folder); the file's previous
    version is untouched. `cause` is the OSError."""

    def __init__(self, path: Path, cause: OSError) -> None:
        reason = cause.strerror or type(cause).__name__
        super().__init__(
            f"could not write {path}: {reason}; its previous version is untouched: free space "
            "or make the folder writable, then run the same command again"
        )
        self.path, self.cause = Path(path), cause


# The errors of the machine's state rather than of the program (see WriteError).
MACHINE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)


def _umask() -> int:
    """This process's umask, read without changing it where the OS tells (Linux), else set and
    put back once, at import."""
    with contextlib.suppress(OSError, ValueError):
        status = Path("/proc/self/status").read_text()
        found = re.search(r"^Umask:\s*([0-7]+)$", status, re.MULTILINE)
        if found:
            return int(found[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# A new file or folder gets the mode open() or mkdir() would give it (0644 and 0755 under the
# usual umask 022), not mkstemp's 0600 or mkdtemp's 0700.
FILE_MODE = 0o666 & ~_umask()
FOLDER_MODE = 0o777 & ~_umask()


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that readers see the old file or the whole new one, never a part.

    The bytes go to a temporary file beside `path` with a name no other writer uses (thread
    or process), are flushed and fsynced, and the file is renamed over `path` with
    os.replace; the folder is fsynced so the rename survives a crash. The file gets the mode
    a plain open() would give it. On any error the temporary file is removed and `path` is
    left as it was.

    Raises:
        WriteError: naming the file, for a full disk, a read-only folder and the like
            (MACHINE_ERRNOS); other errors as they are.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with open(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in MACHINE_ERRNOS:
            raise WriteError(path, err) from err
        raise
    return path


# What atomic_write names its temporary file: "." + the file's name + mkstemp's 8 characters.
_PARTIAL = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete the temporary files atomic_write left in folder when its process was killed
    mid-write (a checkpoint's can be as large as the checkpoint); returns them. Call it only
    while no other process writes there (holding the folder's lock)."""
    if not Path(folder).is_dir():
        return []
    removed = [p for p in Path(folder).iterdir() if _PARTIAL.match(p.name) and p.is_file()]
    for path in removed:
        with contextlib.suppress(OSError):
            path.unlink()
    return removed


def _fsync_folder(folder: Path) -> None:
    if os.name == "nt":  # folders cannot be opened (nor need to be synced) there
        return
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text(path: Path, text: str) -> Path:
    """Atomically write `text` (UTF-8) to path."""
    data = text.encode()
    return atomic_write(path, lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------
# Checked files: a file a later command relies on, with its SHA-256 beside it

CHECKSUM_SUFFIX = ".sha256"


def checksum_file(path: Path) -> Path:
    """Where a file's SHA-256 is kept: beside it, with '.sha256' appended."""
    return Path(path).with_name(Path(path).name + CHECKSUM_SUFFIX)


def write_checked(path: Path, text: str) -> Path:
    """Atomically write `text` to path with its SHA-256 beside it (checksum_file), so that a
    later read tells a file damaged since (a bit flip that leaves valid JSON, say) from the
    one written (read_checked).

    The checksum file is written first and names the new digest and the one before it: a
    kill between the two writes leaves the previous file, which still matches.
    """
    path, data = Path(path), text.encode()
    digest = hashlib.sha256(data).hexdigest()
    previous = [d for d in (_digests(path) or []) if d != digest][:1]
    if not previous and path.is_file():
        with contextlib.suppress(OSError):
            previous = [hashlib.sha256(path.read_bytes()).hexdigest()]
    lines = "".join(f"{d}  {path.name}\n" for d in [digest, *previous])
    atomic_write(checksum_file(path), lambda f: f.write(lines.encode()))
    return atomic_write(path, lambda f: f.write(data))


def read_checked(path: Path, fix: str) -> str:
    """The text of a file written by write_checked, verified against its SHA-256 (a file
    without one, from an older version, is read unverified).

    Raises:
        FileNotFoundError: if there is no such file.
        DamagedFile: naming the file, what is wrong and `fix`, if it is unreadable, not UTF-8
            or not what was written.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise damaged(path, describe(err), fix) from None
    digests = _digests(path)
    if digests is not None and hashlib.sha256(data).hexdigest() not in digests:
        raise damaged(path, f"its SHA-256 differs from {checksum_file(path).name}", fix)
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise damaged(path, describe(err), fix) from None


def _digests(path: Path) -> list[str] | None:
    """The digests a file's checksum file allows (the newest first); None without one."""
    try:
        text = checksum_file(path).read_bytes().decode(errors="replace")
    except OSError:
        return None
    return [line.split()[0] for line in text.splitlines() if line.split()]


def write_checked_json(path: Path, value: Any, indent: int | None = 2) -> Path:
    """write_checked of `value` as JSON (keys sorted, a newline at the end)."""
    return write_checked(path, json.dumps(value, indent=indent, sort_keys=True) + "\n")


def write_json(path: Path, value: Any, indent: int | None = 2) -> Path:
    """Atomically write `value` as JSON (keys sorted, a newline at the end) to path."""
    return write_text(path, json.dumps(value, indent=indent, sort_keys=True) + "\n")


def read_json(path: Path, fix: str, kind: type = dict) -> Any:
    """The JSON value in path, checked to be a `kind` (dict by default), and against its
    SHA-256 when it has one (write_checked).

    Args:
        fix: what the user does about a damaged file, for the message (e.g. "remove it to
            start over").

    Raises:
        FileNotFoundError: if there is no such file (the caller knows what that means).
        DamagedFile: naming the file, what is wrong and `fix`, if it is not readable, not
            UTF-8, not JSON or not a `kind`.
    """
    path = Path(path)
    text = read_checked(path, fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise damaged(path, describe(err), fix) from None
    if not isinstance(value, kind):
        raise damaged(path, f"holds a JSON {type(value).__name__}, not a {kind.__name__}", fix)
    return value


def damaged(path: Path, what: str, fix: str) -> DamagedFile:
    """The one-line error for a damaged file: '{path} is damaged ({what}); {fix}'."""
    return DamagedFile(f"{path} is damaged ({what}); {fix}")


def describe(err: BaseException) -> str:
    """A short reason for a read error: 'empty', 'not JSON: ... at line 3', 'not UTF-8', ..."""
    if isinstance(err, json.JSONDecodeError):
        return "empty" if not err.doc.strip() else f"not JSON: {err.msg} at line {err.lineno}"
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    return " ".join(str(err).split()) or type(err).__name__


# ---------------------------------------------------------------------------------------------
# Output folders: written only when new, empty or the product's own


def claim_folder(
    folder: Path, marker: str, what: str, allowed: Collection[str] = (), setting: str = ""
) -> bool:
    """Check that the product may write into `folder`: it does not exist, it is empty, it holds
    the product's `marker` file (it is the product's own), or it holds only `allowed` names
    (files the product writes before the marker: a lock). Nothing is written here.

    Args:
        what: what the folder holds when it is the product's, for the message ("a sweep's
            files").
        setting: the flag or setting that named the folder, for the message.

    Returns:
        whether the folder is already the product's own (holds the marker).

    Raises:
        NotOurs: naming the folder and the first files that are not the product's, if it holds
            anything else; nothing is changed.
    """
    folder = Path(folder)
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise NotOurs(f"{folder} is a file, not a folder{_named_by(setting)}; choose another")
    if (folder / marker).is_file():
        return True
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise NotOurs(
            f"{folder}{_named_by(setting)} holds files that are not {what} ({shown}); they are "
            "left as they are: choose another folder, or empty this one"
        )
    return False


def _named_by(setting: str) -> str:
    return f" ({setting})" if setting else ""


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


EXPORT_MARKER = ".ddpm-export.json"  # in every folder ddpm-export wrote (ddpm.export)
SAMPLES_MARKER = "generation.json"  # in every folder ddpm-sample draws into (ddpm.images)


def claim_samples_folder(out: Path) -> bool:
    """Check that ddpm-sample may draw into `out`: new, empty, or one it draws into (it holds
    SAMPLES_MARKER, written before any image); returns whether it is one already.

    Raises:
        NotOurs: naming the folder and its first files, if it holds anything else.
    """
    allowed = (SAMPLES_MARKER + CHECKSUM_SUFFIX,)  # written just before the marker
    return claim_folder(out, SAMPLES_MARKER, "images ddpm-sample drew", allowed, "--out")


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
