"""`ddpm-prepare` (issue 36) as a user runs it: a real process SIGKILLed halfway through an
image folder finishes on re-run, keeping the shards it had written and giving the folder's
own tensors; a re-run with nothing changed writes nothing; bad flags are one line, exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import REPO, Cli
from PIL import Image

from ddpm.image_folders import ImageFolderDataset
from ddpm.prepared import MANIFEST, PreparedImages

SCRIPT = str(REPO / "flows" / "prepare_flow.py")


@pytest.mark.slow(seconds=60)
def test_a_killed_preparation_finishes_on_rerun(tmp_path: Path, cli_env) -> None:
    """SIGKILL to the whole process group once 3 of 40 shards are written: no manifest, whole
    shards only; the same command then writes the rest (the 3 untouched) and the prepared
    images equal ImageFolderDataset's; a third run changes no file."""
    rng = np.random.default_rng(0)
    src = tmp_path / "images"
    src.mkdir()
    for i in range(400):
        Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)).save(
            src / f"{i:03d}.png"
        )
    out = tmp_path / "out"
    args = ["--source", str(src), "--out", str(out), "--workers", "1", "--shard-size", "10"]
    cli = Cli(cli_env({}), tmp_path, *args, script=SCRIPT)
    deadline = time.monotonic() + 240
    while len(list(out.glob("*.arrow.json"))) < 3:  # 3 shards and their records written
        assert cli.process.poll() is None and time.monotonic() < deadline, cli.output[-3000:]
        time.sleep(0.05)
    os.killpg(cli.process.pid, signal.SIGKILL)
    cli.finish()
    written = {
        p.name: p.stat().st_mtime_ns
        for p in out.glob("*.arrow")
        if (out / f"{p.name}.json").exists()
    }  # a shard without its record is redone
    assert not (out / MANIFEST).exists() and 3 <= len(written) < 40
    again = subprocess.run([sys.executable, SCRIPT, *args], env=cli_env({}), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in written.items())
    shards = {p.name for p in out.glob("data-*.arrow")}
    assert {p.name for p in out.iterdir()} == {MANIFEST, "preparing.json", "lock", *shards}
    prepared = PreparedImages(out, verify=True)
    folder = ImageFolderDataset(src, 32)
    assert torch.equal(prepared.load(), torch.stack([folder[i] for i in range(len(folder))]))
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    third = subprocess.run([sys.executable, SCRIPT, *args], env=cli_env({}), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert third.returncode == 0 and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp


def test_bad_flags_are_one_line(tmp_path: Path, cli_env) -> None:
    """A misspelt flag (with what was meant), a missing source, an empty one, one whose only
    image is unreadable, a Hugging Face dataset's wrong column, a size the U-Net cannot take
    and a --out holding the user's files: exit 2, no traceback, and the last line one `error:`
    naming it (a source found bad inside the flow run is also in that run's log); the user's
    file is untouched."""
    datasets = pytest.importorskip("datasets")
    (tmp_path / "images").mkdir()
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    datasets.Dataset.from_dict({"picture": [str(tmp_path / "torn" / "a.png")]}).save_to_disk(
        str(tmp_path / "hf")
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("years")
    base = ["--source", "images", "--out", "o"]
    cases = [
        (["--source", "images", "--out", "o", "--imge-size", "32"], "did you mean --image-size"),
        (["--source", "nowhere", "--out", "o"], "--source nowhere: no such folder"),
        (base, "images: no PNG or JPEG images in it"),
        (["--source", "torn", "--out", "o"], "torn: none of its images could be decoded"),
        (["--source", "hf", "--out", "o", "--column", "pixels"], "--column pixels: not a column"),
        ([*base, "--image-size", "48"], "--image-size 48: a multiple of 32"),
        (["--source", "images", "--out", "mine"], "mine (--out) holds files"),
    ]
    for args, said in cases:
        done = subprocess.run([sys.executable, SCRIPT, *args], env=cli_env({}), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert "error: " in last and said in last, done.stderr  # the last line says it
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.txt"]


def test_fid_statistics_of_a_folder_prepared_again_in_place_get_a_new_key(tmp_path: Path) -> None:
    """The training images' FID/KID cache key (data_reference_key) of a prepared dataset
    names its shards' content: data.prepare=auto prepares a changed folder again in the same
    place, and its statistics must not be the old images'."""
    from tiny_run import make_config

    from ddpm.prepare import prepare_folder
    from flows.download import data_reference_key

    src = tmp_path / "images"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(src / f"{i}.png")
    out = prepare_folder(src, tmp_path / "cache", 32)
    config = make_config({"data.dataset": "prepared", "data.folder": out})
    before = data_reference_key(config, str(out))
    assert data_reference_key(config, str(out)) == before
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(src / "1.png")
    os.utime(src / "1.png", ns=(1, 1))
    assert prepare_folder(src, tmp_path / "cache", 32) == out
    assert data_reference_key(config, str(out)) != before
