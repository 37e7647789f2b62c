"""`benchmarks/digits.py`: its colour measure, its sampler specs and a whole small run of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import digits


def test_the_photo_crops_are_seeded_and_balanced() -> None:
    """The colour data is the same 2,000 crops every time, 32x32 RGB, half from each of
    scikit-learn's two photographs."""
    images, labels = digits.photos()
    again, _ = digits.photos()
    assert images.shape == (2000, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again)
    assert np.bincount(labels).tolist() == [1000, 1000]


def test_the_colour_measure_tells_crops_from_grey_and_noise() -> None:
    """Held-out-like real crops (a seeded 200 of the data) score far closer than the same
    crops turned grey, which score closer than uniform noise; grey images have colourfulness
    0, and the real crops cover both photographs."""
    judge = digits.PhotoJudge()
    images, _ = digits.photos()
    rng = np.random.default_rng(1)
    real = images[rng.permutation(len(images))[:200]].transpose(0, 3, 1, 2)
    grey = np.repeat(real.mean(1, keepdims=True).round().astype(np.uint8), 3, axis=1)
    noise = rng.integers(0, 256, real.shape, dtype=np.uint8)
    scores = {name: judge.score(x) for name, x in (("real", real), ("grey", grey),
                                                   ("noise", noise))}  # fmt: skip
    assert scores["real"]["fd"] < scores["grey"]["fd"] / 2 < scores["noise"]["fd"] / 2
    assert scores["grey"]["colourfulness"] == pytest.approx(0.0, abs=1e-9)
    assert scores["real"]["colourfulness"] == pytest.approx(judge.data_colourfulness, rel=0.2)
    assert scores["real"]["coverage"] > 0.95


def test_sampler_specs_take_the_settings_of_the_samplers_on_sigma() -> None:
    """'NAME:STEPS[:ETA][:KEY=VALUE...]' gives SampleConfig's fields; heun's network calls are
    2 per step but the last, the ancestral sampler's all 1,000."""
    spec = digits.parse_sampler("heun:18:s_churn=40:rho=5")
    assert spec == {"sampler": "heun", "steps": 18, "eta": 0.0, "s_churn": 40, "rho": 5}
    assert digits.parse_sampler("ddim:100:1") == {"sampler": "ddim", "steps": 100, "eta": 1.0}
    assert digits.network_calls(spec) == 35
    assert digits.network_calls(digits.parse_sampler("dpmpp_3m_karras:10")) == 10
    assert digits.network_calls(digits.parse_sampler("ddpm")) == 1000


@pytest.mark.slow
def test_a_small_edm_run_samples_and_rebuilds_its_ema(tmp_path: Path) -> None:
    """One epoch of an edm run with non-leaky flips and EMA snapshots through the benchmark's
    own command: it records the measured sigma_data, samples with Heun and from a post-hoc EMA,
    and the table lists both with their network calls."""
    out = tmp_path / "edm"
    sets = ["train.epochs=1", "model.hidden_size=8", "diffusion.formulation=edm",
            "model.augment_labels=true", "train.ema_snapshots=4"]  # fmt: skip
    argv = ["train", "--out", str(out), "--sample", "heun:2", "--ema", "0.1"]
    digits.main(argv + [arg for s in sets for arg in ("--set", s)])
    record = json.loads((out / "train.json").read_text())
    assert record["steps"] == 29 and 0.3 < record["sigma_data"] < 1.0
    assert (out / "ema" / "sigma_rel_0.100.pt").is_file()
    table = digits.table([out]).splitlines()
    rows = [row for row in table if '"heun"' in row]
    assert len(rows) == 2 and all("| 3 |" in row for row in rows)
    assert any('"ema": 0.1' in row for row in rows)


def test_the_mirror_measure_counts_mirrored_digits() -> None:
    """Training digits are never called mirrored; the asymmetric ones mirrored almost always
    are, and symmetric ones seldom (1 mirrored is still a 1)."""
    judge = digits.Judge()
    images, labels = digits.digits()
    rgb = np.repeat(images[:, None], 3, axis=1)
    asymmetric = np.isin(labels, digits.ASYMMETRIC_DIGITS)
    assert judge.score(rgb[:300])["mirrored"] == 0.0
    mirrored = rgb[asymmetric][:300, :, :, ::-1].copy()
    assert judge.score(mirrored)["mirrored"] > 0.9
