"""Preparing a dataset (issue 36, ddpm.prepare): an image folder, CIFAR-10's batches and a
Hugging Face dataset on disk give, prepared, exactly the tensors their own paths give; a
preparation cut short finishes on re-run writing only what is missing; a re-run with nothing
changed does nothing; bad sources end in one error naming them; a folder of the user's is
refused untouched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cifar10 import load_cifar10
from ddpm.files import NotOurs
from ddpm.image_folders import ImageFolderDataset
from ddpm.prepare import LOCK, PLAN, prepare
from ddpm.prepared import MANIFEST, PreparedError, PreparedImages, shard_name
from ddpm.sources import find_source


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n PNG and JPEG images of assorted sizes and modes under folder and a subfolder."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = folder / ("sub" if i % 3 == 0 else ".") / f"im{i:03d}.{'jpg' if i % 4 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels)
        (image.convert("L") if i % 5 == 0 else image).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("channels", [3, 1])
def test_a_folder_prepared_gives_the_folders_own_tensors(tmp_path: Path, channels: int) -> None:
    """Over 3 shards (2 processes): every image equals ImageFolderDataset's, in its order; a
    text file and a truncated PNG are left out of both, the PNG named in one warning."""
    src = tmp_path / "images"
    paths = write_images(src, 11)
    (src / "notes.txt").write_text("not an image")
    (src / "torn.png").write_bytes(paths[0].read_bytes()[:60])
    manifest = prepare(find_source(src), tmp_path / "out", 16, channels, workers=2,
                       shard_size=4)  # fmt: skip
    folder = ImageFolderDataset(src, 16, channels)
    prepared = PreparedImages(tmp_path / "out", verify=True)
    assert len(prepared) == len(folder) == 11 and manifest["skipped"] == 1
    expected = torch.stack([folder[i] for i in range(len(folder))])
    assert torch.equal(prepared.load(), expected)
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 3]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [MANIFEST, PLAN, LOCK, *(shard_name(i, 3) for i in range(3))]
    )


def test_cifar10_batches_prepare_to_the_images_training_reads(tmp_path: Path, cifar_writer) -> None:
    """CIFAR-10's python batches, at 32 px: the same (N, 3, 32, 32) uint8 as load_cifar10."""
    folder = cifar_writer(tmp_path / "data", images_per_batch=7)
    prepare(find_source(tmp_path / "data"), tmp_path / "out", 32)
    assert torch.equal(PreparedImages(tmp_path / "out").load(), load_cifar10(folder))


def test_a_hugging_face_dataset_on_disk_prepares_like_its_files(tmp_path: Path) -> None:
    """A dataset saved with save_to_disk whose image column holds the folder's files: prepared,
    the folder's tensors; a parquet folder of it too; a wrong column is named."""
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "images"
    paths = sorted(write_images(src, 6))
    ds = datasets.Dataset.from_dict(
        {"label": list(range(6)), "picture": [str(p) for p in paths]}
    ).cast_column("picture", datasets.Image())
    ds = ds.map(lambda row: row)  # embeds nothing: the column keeps the files' bytes and paths
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    folder = ImageFolderDataset(src, 16)
    by_name = {p.name: folder[i] for i, p in enumerate(folder.paths)}
    expected = torch.stack([by_name[p.name] for p in paths])
    for name in ("hf", "pq"):
        source = find_source(tmp_path / name)
        assert (source.kind, source.column) == ("hf", "picture")
        prepare(source, tmp_path / f"out-{name}", 16)
        assert torch.equal(PreparedImages(tmp_path / f"out-{name}").load(), expected), name
    with pytest.raises(PreparedError, match=r"--column pixels: not a column of .* picture"):
        find_source(tmp_path / "hf", column="pixels")


def test_a_cut_short_preparation_finishes_and_a_rerun_does_nothing(tmp_path: Path) -> None:
    """A preparation stopped after its first shard (Ctrl-C), one shard then lost, finishes on
    re-run writing only the missing shard; a re-run with nothing changed writes nothing; a
    changed source at another size prepares again over its own files only."""
    src, out = tmp_path / "images", tmp_path / "out"
    write_images(src, 9)

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(find_source(src), out, 16, workers=1, shard_size=3, progress=interrupt)
    assert not (out / MANIFEST).exists() and not (out / shard_name(1, 3)).exists()
    first = (out / shard_name(0, 3)).stat().st_mtime_ns
    prepare(find_source(src), out, 16, workers=1, shard_size=3)
    assert (out / shard_name(0, 3)).stat().st_mtime_ns == first  # kept
    assert len(PreparedImages(out, verify=True)) == 9
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare(find_source(src), out, 16, workers=1, shard_size=3)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    os.utime(next(src.glob("*.jpg")), ns=(1, 1))  # the source changed
    prepare(find_source(src), out, 24, workers=1, shard_size=5)
    assert PreparedImages(out).shape == (3, 24, 24)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, PLAN, LOCK, shard_name(0, 2), shard_name(1, 2)]
    )


def test_bad_sources_and_a_users_folder_are_named(tmp_path: Path) -> None:
    """A missing source, a file, an empty folder, one without images, one whose every image
    is unreadable, and an --out holding the user's files: one error naming each; the user's
    file is untouched."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "file.png").write_bytes(b"")
    for name, said in [("nowhere", "no such folder"), ("file.png", "a file"),
                       ("empty", "no PNG or JPEG images"), ("texts", "1 other files")]:  # fmt: skip
        with pytest.raises(PreparedError, match=rf"--source .*{name}: .*{said}"):
            find_source(tmp_path / name)
    with pytest.raises(PreparedError, match=r"torn: none of its images could be decoded"):
        prepare(find_source(tmp_path / "torn"), tmp_path / "out-torn", 16)
    write_images(tmp_path / "images", 2)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(NotOurs, match=r"mine"):
        prepare(find_source(tmp_path / "images"), mine, 16)
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    assert json.loads((tmp_path / "out-torn" / PLAN).read_text())["shards"] == 1


@pytest.mark.parametrize("in_memory", [True, False])
def test_training_batches_from_a_prepared_folder_are_the_folders(
    tmp_path: Path, in_memory: bool
) -> None:
    """data.dataset=prepared gives the epoch's batches data.dataset=folder gives on the same
    images (order and flips from (seed, epoch)), held in memory or read memory-mapped, for a
    whole epoch and from a mid-epoch batch on (a resume's), and for one rank of two; two
    ranks' slices are disjoint and make up the batch."""
    from tiny_run import make_config

    from ddpm.batches import TrainingData
    from ddpm.datasets import PreparedDataset, TensorImageDataset, prepared_dataset

    write_images(tmp_path / "images", 13)
    prepare(find_source(tmp_path / "images"), tmp_path / "out", 32, workers=1, shard_size=5)
    base = {"train.batch_size": 4, "data.image_size": 32}
    folder = make_config({**base, "data.dataset": "folder", "data.folder": tmp_path / "images"})
    ready = make_config({**base, "data.dataset": "prepared", "data.folder": tmp_path / "out"})
    images = prepared_dataset(tmp_path / "out", 32, 3, memory_fraction=1.0 if in_memory else 0)
    assert isinstance(images, TensorImageDataset if in_memory else PreparedDataset)
    for rank, world in ((0, 1), (1, 2)):
        ours = TrainingData(images, ready, rank, world)
        theirs = TrainingData(ImageFolderDataset(tmp_path / "images", 32), folder, rank, world)
        for epoch, start in ((1, 0), (2, 2)):
            got, want = list(ours.epoch(epoch, start)), list(theirs.epoch(epoch, start))
            assert len(got) == len(want) == 4 - start
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # Two ranks read disjoint slices of each global batch, which together are the batch.
    whole, *ranks = (list(TrainingData(images, ready, r, w).epoch(1)) for r, w in
                     ((0, 1), (0, 2), (1, 2)))  # fmt: skip
    for batch, first, second in zip(whole, *ranks, strict=True):
        assert len(first) + len(second) == len(batch)
        assert torch.equal(torch.cat([first, second]), batch)


def test_a_folder_prepared_on_first_use_is_reused_until_it_changes(tmp_path: Path) -> None:
    """data.prepare=auto's preparation (prepare_folder): the cache folder is named by the image
    folder and the transform; a process finding another one preparing there waits, then
    reuses its work (writes nothing); an image changed in the folder is prepared again into
    the same cache folder, giving the folder's new tensors."""
    import threading

    from filelock import FileLock

    from ddpm.prepare import prepare_folder, prepared_cache

    src, cache = tmp_path / "images", tmp_path / "data" / "prepared"
    paths = write_images(src, 5)
    out = prepared_cache(src, cache, 32, 3)
    assert out.parent == cache and out != prepared_cache(src, cache, 64, 3)
    out.mkdir(parents=True)
    held = FileLock(out / LOCK)
    held.acquire()  # another process is preparing
    result: list[Path] = []
    waiting = threading.Thread(target=lambda: result.append(prepare_folder(src, cache, 32, 3)))
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive() and not (out / MANIFEST).exists()  # it waits, writing nothing
    held.release()
    waiting.join(timeout=60)
    assert result == [out]
    assert torch.equal(PreparedImages(out).load(), all_images(src))
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare_folder(src, cache, 32, 3) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # no work
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))  # another modification time, whatever the clock's resolution
    assert prepare_folder(src, cache, 32, 3) == out
    assert torch.equal(PreparedImages(out).load(), all_images(src))
    assert list(cache.iterdir()) == [out]


def all_images(folder: Path) -> torch.Tensor:
    """ImageFolderDataset's images of folder at 32 px: (N, 3, 32, 32) uint8."""
    images = ImageFolderDataset(folder, 32)
    return torch.stack([images[i] for i in range(len(images))])


def test_the_folder_scan_lists_what_path_rglob_lists_in_its_order(tmp_path: Path) -> None:
    """scan_folder (one scandir pass, used by the folder path and preparation alike) gives
    the files sorted Path(...).rglob gives, in the same order (by parts: `a/b` before `a-b`),
    links to folders not followed, links to files kept."""
    from ddpm.image_folders import scan_folder

    for name in ["a/b.png", "a-b.png", "a.png", "A.jpg", "a/c/d.JPEG", "ab.png", "a b.png",
                 ".h.png", "x.txt", "z/.git/q.png"]:  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"1")
    (tmp_path / "folder-link").symlink_to(tmp_path / "a")
    (tmp_path / "file-link.png").symlink_to(tmp_path / "a.png")
    want = [p.relative_to(tmp_path).as_posix()
            for p in sorted(p for p in tmp_path.rglob("*") if p.is_file())]  # fmt: skip
    images, others = scan_folder(tmp_path)
    assert sorted([f.name for f in images + others], key=lambda n: n.split("/")) == want
    assert [f.name for f in others] == ["x.txt"]
    assert "file-link.png" in [f.name for f in images]


@pytest.mark.slow(seconds=15)
@pytest.mark.parametrize("random_access", [False, True], ids=["mapped", "pread"])
def test_dataloader_workers_read_a_prepared_dataset_too_large_for_memory(
    tmp_path: Path, random_access: bool
) -> None:
    """data.num_workers 2 (forkserver workers, the dataset pickled to them and opened there)
    give the batches the main process gives, mapped or read by pread."""
    from tiny_run import make_config

    from ddpm.batches import TrainingData
    from ddpm.datasets import PreparedDataset
    from ddpm.prepared import PreparedImages

    write_images(tmp_path / "images", 11)
    prepare(find_source(tmp_path / "images"), tmp_path / "out", 32, workers=1, shard_size=4)
    images = PreparedDataset(PreparedImages(tmp_path / "out", random_access=random_access))
    base = {"train.batch_size": 4, "data.dataset": "prepared", "data.folder": tmp_path / "out"}
    alone = TrainingData(images, make_config(base))
    workers = TrainingData(images, make_config({**base, "data.num_workers": 2}))
    for epoch in (1, 2):
        got, want = list(workers.epoch(epoch)), list(alone.epoch(epoch))
        assert len(got) == len(want) == 3
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    workers.close()
