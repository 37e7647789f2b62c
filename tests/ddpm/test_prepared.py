"""Prepared datasets' storage (issue 36, ddpm.prepared): images written as Arrow shards come
back byte for byte at any indices, across shards, as numpy views of the mapped files; the
folder opens with Hugging Face `datasets` where it is installed; a missing, torn or altered
shard or manifest is one error naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.prepared import (
    MANIFEST,
    PreparedError,
    PreparedImages,
    shard_name,
    write_manifest,
    write_shard,
)


def images(n: int, seed: int, shape: tuple[int, ...] = (3, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def prepare(folder: Path, counts: list[int], shape: tuple[int, ...] = (3, 8, 8)) -> np.ndarray:
    """Write shards of `counts` images each and the manifest; returns all images in order."""
    folder.mkdir(parents=True, exist_ok=True)
    parts, shards = [], []
    for i, n in enumerate(counts):
        part = images(n, seed=i, shape=shape)
        name = shard_name(i, len(counts))
        shards.append({"file": name, "count": n, "sha256": write_shard(folder / name, part)})
        parts.append(part)
    write_manifest(folder, shape, shards, source={"kind": "test"})
    return np.concatenate(parts)


@pytest.mark.parametrize("random_access", [False, True], ids=["mapped", "pread"])
@pytest.mark.parametrize("counts", [[10], [7, 5, 9]])
def test_any_indices_come_back_byte_for_byte(
    tmp_path: Path, counts: list[int], random_access: bool
) -> None:
    """gather at a permutation with repeats, a slice across shard bounds and load() all equal
    the written images, from the mapped shards (views of the files) and read by pread (for
    data larger than memory); a gather's result is a copy that outlives close()."""
    written = prepare(tmp_path / "p", counts)
    data = PreparedImages(tmp_path / "p", random_access=random_access, verify=True)
    assert len(data) == sum(counts) and data.shape == (3, 8, 8)
    order = [*np.random.default_rng(0).permutation(len(data)).tolist(), 0, 0, len(data) - 1]
    got = data.gather(order)
    assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(written[order]))
    assert torch.equal(data.slice(3, 12 if len(data) > 12 else 9), torch.from_numpy(
        written[3 : 12 if len(data) > 12 else 9]))  # fmt: skip
    assert torch.equal(data.load(), torch.from_numpy(written))
    if random_access:
        assert data._shards[0].images is None and data._maps == []  # nothing mapped
    else:
        assert not data._shards[0].images.flags.owndata  # a view of the mapped file
    with pytest.raises(IndexError, match=rf"\[0, {len(data)}\)"):
        data.gather([len(data)])
    data.close()
    assert torch.equal(got, torch.from_numpy(written[order]))


def test_the_folder_opens_with_hugging_face_datasets(tmp_path: Path) -> None:
    """A shard is the Arrow stream `datasets` writes: Dataset.from_file reads its `image`
    column as the images' bytes."""
    datasets = pytest.importorskip("datasets")
    written = prepare(tmp_path / "p", [6])
    table = datasets.Dataset.from_file(str(tmp_path / "p" / shard_name(0, 1)))
    assert bytes(table[4]["image"]) == written[4].tobytes()


def test_damaged_files_are_named(tmp_path: Path) -> None:
    """No manifest, a torn manifest, a missing, empty, truncated or bit-flipped shard, and a
    manifest whose counts or shape do not match: each one PreparedError naming the file."""
    folder = tmp_path / "p"
    with pytest.raises(PreparedError, match=r"not a prepared dataset .*ddpm-prepare"):
        PreparedImages(folder)
    prepare(folder, [5, 5])
    shard = folder / shard_name(1, 2)
    good, manifest = shard.read_bytes(), (folder / MANIFEST).read_text()

    def broken(change, match: str, **kwargs) -> None:
        change()
        with pytest.raises(PreparedError, match=match):
            PreparedImages(folder, **kwargs)
        shard.write_bytes(good)
        (folder / MANIFEST).write_text(manifest)

    broken(lambda: (folder / MANIFEST).write_text(manifest[:40]), rf"{MANIFEST}: unreadable")
    broken(shard.unlink, rf"{shard.name}: cannot be read")
    broken(lambda: shard.write_bytes(b""), rf"{shard.name}: cannot be read")
    broken(lambda: shard.write_bytes(good[: len(good) // 2]), rf"{shard.name}: not an Arrow")
    flipped = bytearray(good)
    flipped[-100] ^= 1
    broken(lambda: shard.write_bytes(bytes(flipped)), rf"{shard.name}: damaged", verify=True)
    record = json.loads(manifest)
    record["shards"][1]["count"] = 4
    broken(lambda: (folder / MANIFEST).write_text(json.dumps(record)), "holds 5 images where")
    record = json.loads(manifest)
    record["shape"] = [3, 4, 4]
    broken(lambda: (folder / MANIFEST).write_text(json.dumps(record)), r"not \(3, 4, 4\) uint8")
    assert len(PreparedImages(folder, verify=True)) == 10  # all restored


def test_a_prepared_dataset_at_a_url_is_fetched_checked_and_resumed(tmp_path: Path) -> None:
    """data.folder as a URL (file://, read through pyarrow.fs as s3:// and gs:// are): the
    shards stream into data.root/remote/<url> and read back byte for byte; a second fetch
    rewrites nothing; a copy cut short (a shard and the manifest gone) fetches only the
    missing shard; a shard damaged in the store, or a URL holding no dataset, is named."""
    from ddpm.datasets import fetch_prepared
    from ddpm.errors import DatasetError

    store = tmp_path / "bucket" / "cifar"
    written = prepare(store, [7, 5, 9])
    url = store.as_uri()
    local = fetch_prepared(url, tmp_path / "data")
    assert local.parent == tmp_path / "data" / "remote"
    assert np.array_equal(PreparedImages(local, verify=True).load().numpy(), written)
    stamp = {p.name: p.stat().st_mtime_ns for p in local.iterdir()}
    assert fetch_prepared(url, tmp_path / "data") == local
    assert {p.name: p.stat().st_mtime_ns for p in local.iterdir()} == stamp
    (local / shard_name(1, 3)).unlink()
    (local / MANIFEST).unlink()
    fetch_prepared(url, tmp_path / "data")
    now = {p.name: p.stat().st_mtime_ns for p in local.iterdir()}
    assert sorted(n for n in stamp if now[n] != stamp[n]) == [shard_name(1, 3), MANIFEST]
    assert np.array_equal(PreparedImages(local, verify=True).load().numpy(), written)
    damaged = store / shard_name(2, 3)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a pixel's byte
    damaged.write_bytes(bytes(data))
    (local / shard_name(2, 3)).unlink()
    (local / MANIFEST).unlink()
    with pytest.raises(DatasetError, match=rf"{shard_name(2, 3)}: damaged"):
        fetch_prepared(url, tmp_path / "data")
    assert not (local / MANIFEST).exists() and not (local / shard_name(2, 3)).exists()
    with pytest.raises(DatasetError, match=r"bucket: not a prepared dataset"):
        fetch_prepared(store.parent.as_uri(), tmp_path / "data")
