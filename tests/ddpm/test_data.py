"""Datasets: CIFAR-10 in the official format (read, download, verify), image folders, subsets,
normalisation and the per-epoch batches."""

import hashlib
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.batches import (
    EpochLoader,
    TrainingData,
    denormalize,
    device_epoch_batches,
    normalize,
    steps_per_epoch,
)
from ddpm.cifar10 import download_cifar10, load_cifar10, read_cifar10_batch
from ddpm.datasets import TensorImageDataset, subset_indices
from ddpm.errors import DatasetError
from ddpm.image_folders import ImageFolderDataset

# ---- CIFAR-10 -------------------------------------------------------------------------------


def test_reads_extracted_cifar10_of_any_batch_size(tmp_path: Path, cifar_writer) -> None:
    """Five tiny official-format batches read into one uint8 (N, 3, 32, 32) tensor, pixel-exact
    (R, G, B planes of 32x32 rows); the test batch is not included."""
    folder = cifar_writer(tmp_path, images_per_batch=3, seed=1)
    images = load_cifar10(folder)
    assert images.shape == (15, 3, 32, 32) and images.dtype == torch.uint8
    with open(folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert torch.equal(images[3:6], torch.from_numpy(raw).reshape(3, 3, 32, 32))
    assert images[4, 1, 0, 5] == raw[1, 1024 + 5]  # image 1 of batch 2, green, row 0, col 5


def test_missing_batch_names_the_file(tmp_path: Path, cifar_writer) -> None:
    """A missing data_batch_N fails with its path in the message."""
    folder = cifar_writer(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match="data_batch_4"):
        load_cifar10(folder)


@pytest.mark.parametrize(
    "content",
    [
        b"not a pickle at all",
        pickle.dumps({b"labels": [1, 2]}),  # no data
        pickle.dumps({b"data": np.zeros((2, 100), dtype=np.uint8)}),  # wrong width
        pickle.dumps({b"data": np.zeros((2, 3072), dtype=np.float32)}),  # wrong dtype
    ],
)
def test_malformed_batch_names_the_file(tmp_path: Path, cifar_writer, content: bytes) -> None:
    """A malformed batch file fails with a DatasetError naming it, not a KeyError traceback."""
    folder = cifar_writer(tmp_path)
    (folder / "data_batch_3").write_bytes(content)
    with pytest.raises(DatasetError, match=r"data_batch_3.*not a CIFAR-10 python batch"):
        load_cifar10(folder)


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_planted_pickle_payload_never_runs(tmp_path: Path, cifar_writer) -> None:
    """A batch file whose pickle would create a file when loaded is refused; the file never
    appears."""
    folder = cifar_writer(tmp_path)
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.target = str(marker)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": payload}))
    with pytest.raises(DatasetError, match=r"refusing to load pathlib"):
        read_cifar10_batch(folder / "data_batch_1")
    assert not marker.exists()


def make_archive(source_root: Path, archive: Path) -> str:
    """Pack source_root/cifar-10-batches-py into an official-layout .tar.gz; returns its MD5."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(tmp_path: Path, cifar_writer, http_server) -> None:
    """The archive is downloaded from a server on 127.0.0.1, its MD5 checked, and extracted."""
    url, served = http_server
    cifar_writer(tmp_path / "src", images_per_batch=2)
    md5 = make_archive(tmp_path / "src", served / "cifar-10-python.tar.gz")
    root = tmp_path / "data"
    folder = download_cifar10(root, f"{url}/cifar-10-python.tar.gz", md5)
    assert folder == root / "cifar-10-batches-py"
    assert load_cifar10(folder).shape == (10, 3, 32, 32)


def test_checksum_mismatch_removes_archive_and_says_where_to_put_data(
    tmp_path: Path, cifar_writer, http_server, caplog
) -> None:
    """A corrupt download is removed, fetched once more, then fails with a clear message that
    names the archive and where to place the data by hand."""
    url, served = http_server
    cifar_writer(tmp_path / "src", images_per_batch=2)
    make_archive(tmp_path / "src", served / "cifar-10-python.tar.gz")
    root = tmp_path / "data"
    with caplog.at_level(logging.WARNING), pytest.raises(DatasetError) as err:
        download_cifar10(root, f"{url}/cifar-10-python.tar.gz", "0" * 32)
    message = str(err.value)
    assert "failed its MD5 check twice" in message
    assert str(root / "cifar-10-python.tar.gz") in message and "data_batch_1..5" in message
    assert not (root / "cifar-10-python.tar.gz").exists()
    assert sum("failed its MD5 check" in r.message for r in caplog.records) == 2


def test_unreachable_server_fails_with_where_to_put_data(tmp_path: Path, http_server) -> None:
    """Offline (nothing served): a clear error saying where to place the archive or folder."""
    url, _ = http_server
    with pytest.raises(DatasetError, match=r"could not download .*cifar-10-batches-py"):
        download_cifar10(tmp_path / "data", f"{url}/missing.tar.gz", "0" * 32)


def test_download_errors_say_whether_trying_again_can_help(tmp_path: Path, http_server) -> None:
    """A refused connection may pass (transient, retried); a 404 and a host name that does not
    resolve (.invalid, RFC 2606) fail the same way every time (not retried)."""
    url, _ = http_server
    refused = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # discard port: nothing listens
    for source, transient in (
        (refused, True),
        (f"{url}/missing.tar.gz", False),
        ("http://cifar.invalid/cifar-10-python.tar.gz", False),
    ):
        with pytest.raises(DatasetError, match="could not download") as err:
            download_cifar10(tmp_path / "data", source, "0" * 32)
        assert err.value.transient is transient, (source, err.value)


def test_extracted_folder_needs_no_network(tmp_path: Path, cifar_writer) -> None:
    """With the folder extracted, download_cifar10 returns it without touching the URL."""
    cifar_writer(tmp_path)
    folder = download_cifar10(tmp_path, "http://127.0.0.1:9/unreachable.tar.gz", "0" * 32)
    assert folder == tmp_path / "cifar-10-batches-py"


def test_verified_archive_is_extracted_without_download(tmp_path: Path, cifar_writer) -> None:
    """An archive already in place with the right MD5 is extracted offline."""
    cifar_writer(tmp_path / "src", images_per_batch=1)
    root = tmp_path / "data"
    root.mkdir()
    md5 = make_archive(tmp_path / "src", root / "cifar-10-python.tar.gz")
    folder = download_cifar10(root, "http://127.0.0.1:9/unreachable.tar.gz", md5)
    assert load_cifar10(folder).shape == (5, 3, 32, 32)


# ---- image folders --------------------------------------------------------------------------


def test_image_folder_resizes_and_center_crops(tmp_path: Path, caplog) -> None:
    """PNG and JPEG of any size, in subfolders, become (3, S, S) uint8; other files are skipped
    with one warning that counts and names them."""
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "wide.png")
    Image.new("L", (30, 50), 128).save(tmp_path / "sub" / "tall.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with caplog.at_level(logging.WARNING):
        dataset = ImageFolderDataset(tmp_path, image_size=32)
    assert len(dataset) == 2
    assert [r.message for r in caplog.records if "skipped" in r.message] == [
        f"{tmp_path}: skipped 2 unreadable or non-image files (broken.png, notes.txt)"
    ]
    red, gray = dataset[1], dataset[0]  # sorted paths: sub/tall.JPG, wide.png
    assert red.shape == gray.shape == (3, 32, 32) and red.dtype == torch.uint8
    assert red[0].float().mean() > 250 and red[1:].float().mean() < 5
    assert gray.float().std() < 2


def test_damaged_images_are_skipped_or_stood_in_for_by_the_next(tmp_path: Path, caplog) -> None:
    """A truncated JPEG (verify() reads no pixels, but its end marker is missing) and a PNG
    declaring 100000 x 100000 pixels (a decompression bomb) are skipped at the scan; a PNG
    whose pixel data is damaged passes the scan and, when read, is named in one warning and
    stood in for by the next image, the same every time."""
    import io
    import zlib

    Image.new("RGB", (40, 40), (0, 0, 255)).save(tmp_path / "a.png")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 255, 0)).save(jpeg, format="JPEG")
    (tmp_path / "b.jpg").write_bytes(jpeg.getvalue()[:-100])
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(png, format="PNG")
    data = bytearray(png.getvalue())
    bomb = data[:16] + (100_000).to_bytes(4, "big") * 2 + data[24:29]  # IHDR: type, size, ...
    bomb += zlib.crc32(bomb[12:29]).to_bytes(4, "big") + data[33:]  # ... and a valid CRC
    (tmp_path / "bomb.png").write_bytes(bomb)
    start = data.index(b"IDAT")  # the chunk's type; its length before, its data after
    length = int.from_bytes(data[start - 4 : start], "big")
    data[start + 6 : start + length] = bytes(length - 6)  # the pixels, zeroed
    crc = zlib.crc32(data[start : start + 4 + length])  # a valid chunk: verify() passes it
    data[start + 4 + length : start + 8 + length] = crc.to_bytes(4, "big")
    (tmp_path / "c.png").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        dataset = ImageFolderDataset(tmp_path, image_size=32)
        assert [p.name for p in dataset.paths] == ["a.png", "c.png"]
        assert "skipped 2 unreadable or non-image files (b.jpg, bomb.png)" in caplog.text
        blue = dataset[0]
        assert torch.equal(dataset[1], blue) and torch.equal(dataset[1], blue)
    assert blue[2].float().mean() > 250
    assert caplog.text.count("c.png cannot be decoded") == 1


def test_image_folder_grayscale(tmp_path: Path) -> None:
    """channels=1 gives (1, S, S) images."""
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "a.png")
    assert ImageFolderDataset(tmp_path, image_size=32, channels=1)[0].shape == (1, 32, 32)


def test_empty_or_missing_image_folder_is_a_clear_error(tmp_path: Path) -> None:
    """A folder without images, or no folder, fails with a message naming it."""
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(DatasetError, match="no readable PNG or JPEG"):
        ImageFolderDataset(tmp_path, image_size=32)
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", image_size=32)


# ---- subsets, normalisation, batches --------------------------------------------------------


def test_subset_is_reproducible_from_the_seed() -> None:
    """subset picks N distinct indices, the same for the same seed, others for another seed."""
    a, b, c = subset_indices(1000, 50, 7), subset_indices(1000, 50, 7), subset_indices(1000, 50, 8)
    assert a == b != c
    assert len(set(a)) == 50 and a == sorted(a) and all(0 <= i < 1000 for i in a)
    assert subset_indices(10, 0, 7) == list(range(10))
    with pytest.raises(ValueError, match=r"subset must be in \[0, 10\]"):
        subset_indices(10, 11, 0)


def test_normalize_is_each_level_rounded_once() -> None:
    """Every uint8 level maps to float32(i / 127.5 - 1) computed in float64: one rounding, so
    the CPU and CUDA paths (whose scalar division rounds differently) give the same bits."""
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    expected = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).float().reshape(1, 1, 16, 16)
    got = normalize(levels)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_normalize_and_inverse() -> None:
    """uint8 0..255 maps to [-1, 1] and back to [0, 1]."""
    images = torch.tensor([0, 128, 255], dtype=torch.uint8)
    x = normalize(images)
    assert x.tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    assert denormalize(x).tolist() == pytest.approx([0.0, 128 / 255, 1.0], abs=1e-6)
    assert denormalize(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


def numbered_images(n: int) -> TensorImageDataset:
    """n 1x1x2 images whose first pixel is their index (so batches show order and flips)."""
    images = torch.zeros(n, 1, 1, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    images[:, 0, 0, 1] = 255
    return TensorImageDataset(images)


def test_epoch_loader_batches_cover_the_dataset_once_per_epoch() -> None:
    """Every image appears once per epoch; order depends on (seed, epoch) only; flips happen."""
    dataset = numbered_images(50)

    def epoch(seed: int, e: int, flip: bool = True) -> torch.Tensor:
        return torch.cat(list(EpochLoader(dataset, 8, seed=seed).epoch(e, random_flip=flip)))

    first = epoch(0, 0)
    assert first.shape == (50, 1, 1, 2)
    assert torch.equal(first, epoch(0, 0))
    assert not torch.equal(first, epoch(0, 1)) and not torch.equal(first, epoch(1, 0))
    flipped = first[:, 0, 0, 0] == 1.0  # the 255 pixel moved to the front
    assert 10 < flipped.sum() < 40
    ids = torch.where(flipped, first[:, 0, 0, 1], first[:, 0, 0, 0])
    assert sorted(((ids + 1) * 127.5).round().long().tolist()) == list(range(50))
    unflipped = epoch(0, 0, flip=False)
    assert torch.all(unflipped[:, 0, 0, 1] == 1.0)


def test_epoch_loader_resumes_mid_epoch() -> None:
    """Starting at batch k yields exactly the batches k.. of the uninterrupted epoch."""
    dataset = numbered_images(50)
    full = list(EpochLoader(dataset, 8, seed=3).epoch(2))
    resumed = list(EpochLoader(dataset, 8, seed=3).epoch(2, start_batch=4))
    assert len(full) == steps_per_epoch(50, 8) == 7
    assert all(torch.equal(a, b) for a, b in zip(full[4:], resumed, strict=True))


@pytest.mark.slow
def test_epoch_loader_batches_do_not_depend_on_workers(tmp_path: Path, cifar_writer) -> None:
    """Two forkserver workers give the same batches as loading in-process."""
    dataset = TensorImageDataset(load_cifar10(cifar_writer(tmp_path, images_per_batch=6)))
    inline = list(EpochLoader(dataset, 7, seed=0).epoch(1))
    workers = list(EpochLoader(dataset, 7, seed=0, num_workers=2).epoch(1))
    assert all(torch.equal(a, b) for a, b in zip(inline, workers, strict=True))


def test_tensor_dataset_rejects_non_uint8() -> None:
    """In-memory datasets must be uint8 (N, C, H, W)."""
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(torch.zeros(2, 3, 32, 32))


def test_device_resident_batches_equal_the_dataloader_path() -> None:
    """For the same seed and epoch, device-resident batches (gathered, flipped and normalised
    on the device) equal the DataLoader path's, from the start and from a mid-epoch batch."""
    images = torch.randint(
        0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    for start in (0, 2):
        loaded = list(
            EpochLoader(TensorImageDataset(images), 8, seed=4).epoch(3, start_batch=start)
        )
        resident = list(device_epoch_batches(images, 8, seed=4, epoch=3, start_batch=start))
        assert len(loaded) == len(resident) == 5 - start
        assert all(torch.equal(a, b) for a, b in zip(loaded, resident, strict=True))


# ---- one DataLoader across epochs -----------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 8, 8) uint8 noise: tiny, and every flip shows."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)


def worker_pids(loader: EpochLoader) -> list[int]:
    """The PIDs of the loader's live DataLoader workers (torch keeps them on its iterator)."""
    workers = loader.dataloader._iterator._workers
    assert all(w.is_alive() for w in workers)
    return [w.pid for w in workers]


def assert_same_batches(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Same number of batches, each bit-identical."""
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.slow
def test_workers_persist_across_epochs_and_batches_match_device_path() -> None:
    """One EpochLoader with two workers serves consecutive epochs from the same worker
    processes, and each epoch's batches equal device_epoch_batches' for that seed and epoch."""
    images = random_images(21)
    loader = EpochLoader(TensorImageDataset(images), 4, num_workers=2, seed=5)
    first = list(loader.epoch(0))
    pids = worker_pids(loader)
    second = list(loader.epoch(1))
    assert len(pids) == 2 and worker_pids(loader) == pids
    assert_same_batches(first, list(device_epoch_batches(images, 4, seed=5, epoch=0)))
    assert_same_batches(second, list(device_epoch_batches(images, 4, seed=5, epoch=1)))


@pytest.mark.slow
def test_abandoned_epoch_does_not_spoil_the_next() -> None:
    """An epoch dropped after one batch, and one ended by an exception in the consumer, leave
    the next epoch and a mid-epoch start exact, on the same workers."""
    images = random_images(21)
    loader = EpochLoader(TensorImageDataset(images), 4, num_workers=2, seed=2)
    dropped = loader.epoch(0)
    next(dropped)
    pids = worker_pids(loader)
    del dropped
    assert_same_batches(
        list(loader.epoch(1)), list(device_epoch_batches(images, 4, seed=2, epoch=1))
    )
    with pytest.raises(ValueError, match="consumer failed"):
        for _ in loader.epoch(2):
            raise ValueError("consumer failed")
    resumed = list(loader.epoch(3, start_batch=2))
    assert_same_batches(
        resumed, list(device_epoch_batches(images, 4, seed=2, epoch=3, start_batch=2))
    )
    assert len(resumed) == 4 and worker_pids(loader) == pids


def test_stale_epoch_cannot_read_the_next_epochs_batches() -> None:
    """Reading on from an epoch after a later one started fails loudly (with persistent workers
    it would otherwise be handed the later epoch's images)."""
    loader = EpochLoader(numbered_images(12), 4)
    stale = loader.epoch(0)
    next(stale)
    assert len(list(loader.epoch(1))) == 3
    with pytest.raises(RuntimeError, match="epoch 0 read on after a later epoch started"):
        next(stale)


def test_training_data_keeps_one_loader_for_all_epochs(tiny_config) -> None:
    """A run's TrainingData reads every epoch through one EpochLoader (its workers persist),
    starts it only when an epoch needs it, and drops it on close."""
    config = tiny_config({"data.loader": "dataloader", "data.image_size": 32})
    data = TrainingData(numbered_images(10), config)
    assert data._loader is None
    first = list(data.epoch(1))
    loader = data._loader
    assert len(first) == 3 and loader is not None
    assert len(list(data.epoch(2, start_batch=1))) == 2 and data._loader is loader
    data.close()
    assert data._loader is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda])])
def test_batches_land_on_the_device_bit_identical(device: str) -> None:
    """device= yields float32 batches on that device, bit-identical to device_epoch_batches
    there and (values) to the CPU path; on CUDA the uint8 batches come through pinned memory."""
    images = random_images(10)
    dataset = TensorImageDataset(images)
    pinned = device == "cuda"
    got = list(EpochLoader(dataset, 4, seed=1, pin_memory=pinned).epoch(2, device=device))
    assert all(x.device.type == device and x.dtype == torch.float32 for x in got)
    assert_same_batches(got, list(device_epoch_batches(images.to(device), 4, seed=1, epoch=2)))
    on_cpu = list(EpochLoader(dataset, 4, seed=1).epoch(2))
    assert_same_batches([x.cpu() for x in got], on_cpu)
