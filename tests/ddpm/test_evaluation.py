"""FID/KID with torch-fidelity's Inception (random weights of the official layout): about zero
for a set against itself, larger for noise than for real images, the reference read once and
cached under a key that names the weights, one-line errors when the weights are missing."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from inception_weights import inception_shapes, write_random_inception_weights
from torch.utils.data import Dataset

from ddpm import evaluation
from ddpm.errors import UserError
from ddpm.evaluation import (
    INCEPTION_FILE,
    INCEPTION_URL,
    EvaluationError,
    compute_metrics,
    reference_key,
)
from flows.children import free_port

# One worker builds the module's shared fixtures once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("evaluation")

# Images per set: Inception runs at 299 px whatever the input size, about 0.25 s an image on
# one CPU thread, and each FID adds ~3 s for the eigenvalues of a 2048 x 2048 product.
N = 16


def smooth_images(n: int, seed: int, channels: int = 3) -> torch.Tensor:
    """(n, channels, 32, 32) uint8 "real" images: random 4x4 colour fields, bicubic-upsampled."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=generator)
    x = F.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def noise_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 32, 32) uint8 uniform noise."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)


class CountingImages(Dataset):
    """Items of a uint8 (N, C, H, W) tensor, counting how many were read."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.reads = images, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads += 1
        return self.images[index]


def test_the_module_runs_on_one_worker(request: pytest.FixtureRequest) -> None:
    """Under pytest-xdist's loadgroup, this module's tests carry its group (so one worker runs
    them all and builds `scores` once); pytest 9.2 silently broke that (pytest-xdist#1386)."""
    on_worker = hasattr(request.config, "workerinput")  # set on pytest-xdist's workers
    if not (on_worker and request.config.getoption("loadgroup", False)):
        pytest.skip("not distributed by group")
    assert request.node.nodeid.endswith("@evaluation"), request.node.nodeid


@pytest.fixture(scope="module")
def scores(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real half A as the reference (counted, cached), scored against half B twice, against
    noise, and against itself; with the reference's read count after each call."""
    real = smooth_images(2 * N, seed=0)
    reference = CountingImages(real[:N])
    key = reference_key("smooth", N, 0, weights=weights)
    cache = tmp_path_factory.mktemp("fid-cache")
    out: dict = {"key": key, "cache": cache, "reads": []}
    for name, fake in [("b", real[N:]), ("b_again", real[N:]), ("noise", noise_images(N, 1))]:
        out[name] = compute_metrics(
            CountingImages(fake), reference, reference_key=key, cache_dir=cache, weights=weights
        )
        out["reads"].append(reference.reads)
    out["itself"] = compute_metrics(
        real[:N], reference, reference_key=key, cache_dir=cache, weights=weights
    )
    out["reads"].append(reference.reads)
    return out


@pytest.mark.slow(seconds=40)  # with the module's scores
def test_set_against_itself_scores_zero(scores: dict) -> None:
    """FID and KID of a set against itself are about 0 (and far below real vs noise)."""
    # Seen: FID -3.6e-6 (round-off in the 2048-d eigenvalues) vs 14.8 for noise; KID -3.6e-4,
    # the unbiased MMD² of a set with itself, -2/(m(m-1)) Σ_i (k_ii - mean_j k_ij), vs 0.023.
    itself, noise = scores["itself"], scores["noise"]
    assert abs(itself["fid"]) < 1e-3
    assert abs(itself["kid"]) < 1e-3 < noise["kid"] / 10
    assert set(itself) == {"fid", "kid", "kid_std"}


@pytest.mark.slow
def test_noise_scores_worse_than_other_real_half(scores: dict) -> None:
    """FID and KID of noise against real images exceed those of the other real half."""
    assert scores["noise"]["fid"] > scores["b"]["fid"] > 0  # seen: 14.8 vs 0.60
    assert scores["noise"]["kid"] > scores["b"]["kid"]  # seen: 0.023 vs -2.0e-4


@pytest.mark.slow
def test_second_evaluation_reads_the_cache(scores: dict) -> None:
    """The reference is read once; later calls with its key use the cache and agree exactly."""
    first_reads = scores["reads"][0]
    assert first_reads >= N
    assert scores["reads"] == [first_reads] * 4
    assert scores["b_again"] == scores["b"]
    cached = sorted(p.name for p in scores["cache"].iterdir())
    prefix = f"{scores['key']}-inception-v3-compat"
    assert cached == [f"{prefix}-features-2048.pt", f"{prefix}-stat-fid-2048.pt"]


def test_other_weights_give_another_key(weights: Path, tmp_path: Path) -> None:
    """The reference key changes with the weights' content, not with where the file lies."""
    key = reference_key("cifar10", 50_000, weights=weights)
    moved = shutil.copy(weights, tmp_path / INCEPTION_FILE)
    assert reference_key("cifar10", 50_000, weights=moved) == key
    write_random_inception_weights(moved, seed=1)  # same name and size, other values
    assert reference_key("cifar10", 50_000, weights=moved) != key
    assert reference_key("cifar10", 50_000, weights=None) != key
    assert reference_key("cifar10", 10_000, weights=weights) != key
    assert key.startswith("ref-") and len(key) == 20


def test_missing_weights_file_is_one_line(weights: Path, tmp_path: Path) -> None:
    """A weights path that does not exist gives a one-line EvaluationError naming the file."""
    missing = tmp_path / "nowhere" / INCEPTION_FILE
    images = smooth_images(4, seed=0)
    with pytest.raises(EvaluationError) as raised:
        compute_metrics(images, images, reference_key="ref-x", cache_dir=tmp_path, weights=missing)
    message = str(raised.value)
    assert "\n" not in message and str(missing) in message and "eval.weights" in message
    assert isinstance(raised.value, UserError)
    with pytest.raises(EvaluationError, match="does not exist"):
        reference_key("cifar10", weights=missing)


def test_failed_download_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """weights=None without a reachable URL fails fast with one line naming eval.weights."""
    port = free_port()  # a port nothing listens on: the connection is refused
    monkeypatch.setattr(evaluation, "INCEPTION_URL", f"http://127.0.0.1:{port}/{INCEPTION_FILE}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    images = smooth_images(4, seed=0)
    with pytest.raises(EvaluationError) as raised:
        compute_metrics(images, images, reference_key="ref-x", cache_dir=tmp_path / "c")
    message = str(raised.value)
    assert (
        "\n" not in message and "eval.weights" in message and "could not be downloaded" in message
    )
    assert list((tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == []  # no partial file


def test_weights_that_run_code_are_refused(plant_pickle, weights: Path, tmp_path: Path) -> None:
    """A weights file whose unpickling would run code is refused before torch-fidelity loads it."""
    hostile = plant_pickle(tmp_path / INCEPTION_FILE, tmp_path / "pwned")
    images = smooth_images(4, seed=0)
    with pytest.raises(EvaluationError, match="refused, it holds pickled objects"):
        compute_metrics(images, images, reference_key="ref-x", cache_dir=tmp_path, weights=hostile)
    assert not (tmp_path / "pwned").exists()


def test_inception_is_loaded_from_the_bytes_that_were_checked(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch-fidelity unpickles the weights with weights_only=False: it is handed the very
    bytes that were checked to hold only tensors, never the file's path, so a file swapped
    after the check cannot run code. (torch.load is watched, not replaced.)"""
    calls: list[tuple[object, object]] = []
    load = torch.load

    def watched(f, *args, **kwargs):
        calls.append((f, kwargs.get("weights_only")))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", watched)
    images = smooth_images(4, seed=3)
    compute_metrics(images, images, reference_key="ref-bytes", cache_dir=tmp_path,
                    metrics=("kid",), weights=weights)  # fmt: skip
    unchecked = [f for f, safe in calls if not safe]
    assert unchecked and all(isinstance(f, io.BytesIO) for f in unchecked), calls
    assert not [f for f, _ in calls if isinstance(f, (str, Path)) and Path(f) == weights]


def test_one_channel_set_scores_as_its_rgb_copy(
    weights: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """A 1-channel set is scored as its gray RGB copy (FID about 0), with no console output."""
    gray = smooth_images(8, seed=2, channels=1)  # (8, 1, 32, 32)
    rgb = CountingImages(gray.expand(-1, 3, -1, -1))
    out = compute_metrics(gray, rgb, reference_key="ref-gray", cache_dir=tmp_path, weights=weights)
    assert abs(out["fid"]) < 1e-3 and abs(out["kid"]) < 1e-3
    assert capfd.readouterr() == ("", "")


def test_unknown_metric_is_named(weights: Path, tmp_path: Path) -> None:
    """An unknown metric name raises ValueError naming it, before any image is read."""
    images = CountingImages(smooth_images(4, seed=0))
    with pytest.raises(ValueError, match="'inception_score'"):
        compute_metrics(
            images,
            images,
            reference_key="ref-x",
            cache_dir=tmp_path,
            metrics=("fid", "inception_score"),
            weights=weights,
        )
    assert images.reads == 0


def test_random_weights_have_the_official_layout(weights: Path) -> None:
    """The test weights load strictly into torch-fidelity's Inception; the URL is its own."""
    from torch_fidelity.feature_extractor_inceptionv3 import (
        URL_INCEPTION_V3,
        FeatureExtractorInceptionV3,
    )

    state = torch.load(weights, weights_only=True)
    assert {k: v.shape for k, v in state.items()} == inception_shapes()
    assert len(state) == 472 and state["fc.weight"].shape == (1008, 2048)
    FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=weights
    )
    assert INCEPTION_URL == URL_INCEPTION_V3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scores_on_cuda(weights: Path, tmp_path: Path) -> None:
    """On "cuda:0" a set against itself scores about 0 and noise scores worse than real."""
    real = smooth_images(16, seed=0)
    run = dict(reference_key="ref-cuda", cache_dir=tmp_path, weights=weights, device="cuda:0")
    itself = compute_metrics(real[:8], real[:8], **run)
    other, noise = (compute_metrics(x, real[:8], **run) for x in (real[8:], noise_images(8, 1)))
    assert abs(itself["fid"]) < 1e-2
    assert noise["fid"] > other["fid"] and noise["kid"] > other["kid"]
