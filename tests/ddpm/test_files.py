"""Files the product writes and reads again (ddpm.files): atomic writes, damaged files named in
one line, and output folders written only when they are the product's."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import pytest

from ddpm.files import (
    FILE_MODE,
    DamagedFile,
    NotOurs,
    WriteError,
    atomic_write,
    claim_folder,
    read_json,
    remove_partial_writes,
    write_text,
)
from ddpm.marked_folders import check_replaceable, remove_listed, write_marker


def test_failed_write_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    """An error while writing leaves the old file as it was and no temporary file behind."""
    path = tmp_path / "epoch_001.pt"
    path.write_bytes(b"old contents")

    def broken(f) -> None:
        f.write(b"half a new fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_001.pt"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS])
def test_a_full_disk_is_a_one_line_error_naming_the_file(tmp_path: Path, code: int) -> None:
    """A write the machine refuses (a full disk or quota, the size limit, a read-only folder)
    is a WriteError (exit 2 at the command line) naming the file and saying what to do; the
    previous file is untouched and no temporary file is left."""
    path = tmp_path / "sweep.json"
    path.write_text("{}")

    def refused(f) -> None:
        f.write(b"{")
        raise OSError(code, "No space left on device")

    with pytest.raises(WriteError) as err:
        atomic_write(path, refused)
    assert str(err.value).startswith(f"could not write {path}: No space left on device;")
    assert "\n" not in str(err.value) and err.value.cause.errno == code
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["sweep.json"]


def test_writers_of_one_file_from_many_threads_never_tear_it(tmp_path: Path) -> None:
    """Eight threads writing the same file 25 times each (as the API watcher's save and the
    checkpoint task may): the file is always one writer's whole contents, no temporary file
    is left, and it has the mode open() gives (0644 under umask 022), not mkstemp's 0600."""
    path = tmp_path / "metrics.jsonl"
    contents = [(f"{i}" * 20_000).encode() for i in range(8)]
    torn: list[bytes] = []

    def writer(data: bytes) -> None:
        for _ in range(25):
            atomic_write(path, lambda f: f.write(data))
            seen = path.read_bytes()
            if seen not in contents:
                torn.append(seen[:20])

    threads = [threading.Thread(target=writer, args=(c,)) for c in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not torn
    assert path.read_bytes() in contents
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert path.stat().st_mode & 0o777 == FILE_MODE


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty"),
        (b'{"epoch": 3, "lo', "not JSON"),
        (b'{"epoch": 3}'[:5] + b"\xff\xfe", "not UTF-8"),
        (b"[1, 2, 3]", "holds a JSON list, not a dict"),
        (b"\x00" * 64, "not JSON"),
    ],
    ids=["empty", "truncated", "binary", "wrong-type", "zeros"],
)
def test_a_damaged_json_file_is_named_in_one_line(tmp_path: Path, content: bytes, why: str) -> None:
    """read_json names the file, what is wrong with it and what to do, in one line; the file
    is left as it is. A missing file is FileNotFoundError (the caller knows what it means)."""
    path = tmp_path / "settings.json"
    path.write_bytes(content)
    with pytest.raises(DamagedFile) as err:
        read_json(path, "remove it")
    message = str(err.value)
    assert message.startswith(f"{path} is damaged (") and why in message
    assert message.endswith("; remove it") and "\n" not in message
    assert path.read_bytes() == content
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json", "")


def test_an_output_folder_is_claimed_only_when_new_empty_or_ours(tmp_path: Path) -> None:
    """claim_folder accepts a missing or empty folder, one holding its marker, or one holding
    only what is written before the marker; a folder with a user's file is refused naming
    it (and how many more), and a file in the folder's place is refused; nothing changes."""
    assert claim_folder(tmp_path / "new", "sweep.json", "a sweep's") is False
    (tmp_path / "empty").mkdir()
    assert claim_folder(tmp_path / "empty", "sweep.json", "a sweep's") is False
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "lock").write_text("123\n")
    assert claim_folder(ours, "sweep.json", "a sweep's", allowed=("lock",)) is False
    (ours / "sweep.json").write_text("{}")
    (ours / "trial-000").mkdir()
    assert claim_folder(ours, "sweep.json", "a sweep's") is True
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "lock"):
        (mine / name).write_text(name)
    with pytest.raises(NotOurs, match=r"mine \(run.name\) holds files that are not a "
                       r"sweep.s \(a\.txt, b\.txt, c\.txt and 1 more\)"):  # fmt: skip
        claim_folder(mine, "sweep.json", "a sweep's", ("lock",), "run.name")
    assert sorted(p.name for p in mine.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt", "lock"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotOurs, match="is a file, not a folder"):
        claim_folder(tmp_path / "file", "sweep.json", "a sweep's")


def test_a_replaced_folder_loses_only_the_files_its_marker_lists(tmp_path: Path) -> None:
    """check_replaceable accepts a folder whose marker lists every file unchanged, and refuses
    one with an unlisted or changed file; remove_listed deletes only the listed files (a file
    dropped in later survives, and the folder with it)."""
    folder = tmp_path / "export"
    write_text(folder / "unet" / "config.json", "{}")
    write_text(folder / "README.md", "card")
    write_marker(folder, ".marker.json", "ddpm-export")
    check_replaceable(folder, ".marker.json", "ddpm-export", "--out")
    assert set(json.loads((folder / ".marker.json").read_text())["files"]) == {
        "README.md", "unet/config.json"
    }  # fmt: skip
    (folder / "unet" / "mine.txt").write_text("keep me")
    with pytest.raises(NotOurs, match=r"holds unet/mine\.txt, that ddpm-export did not write"):
        check_replaceable(folder, ".marker.json", "ddpm-export", "--out")
    assert remove_listed(folder, ".marker.json") is False
    assert [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))] == [
        "unet", "unet/mine.txt"
    ]  # fmt: skip
    assert (folder / "unet" / "mine.txt").read_text() == "keep me"


def test_the_core_imports_where_there_is_no_fcntl() -> None:
    """Every module of ddpm/ imports where `fcntl` does not exist (Windows): the run folder's
    and the download's locks come from filelock, not fcntl."""
    import subprocess
    import sys

    modules = sorted(p.stem for p in (Path(__file__).parents[2] / "ddpm").glob("*.py"))
    code = (
        "import sys, warnings; sys.modules['fcntl'] = None; warnings.simplefilter('ignore')\n"
        f"for name in {modules!r}: __import__('ddpm.' + name)\n"
        "print('imported', len(sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[2])  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("imported"), done.stderr[-2000:]


def test_a_killed_writes_temporary_file_is_removed_and_nothing_else(tmp_path: Path) -> None:
    """remove_partial_writes deletes the temporary files atomic_write leaves when its process is
    killed mid-write (".NAME.XXXXXXXX.tmp"), and no other file, however alike."""
    left = tmp_path / ".step_0000018.pt.gwqtf0o5.tmp"
    left.write_bytes(b"half a checkpoint")
    kept = [".notes.tmp", "step.tmp", ".a.tmp", ".step_0000018.pt.gwqtf0o5.tmp.bak"]
    for name in kept:
        (tmp_path / name).write_text("mine")
    assert remove_partial_writes(tmp_path) == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
