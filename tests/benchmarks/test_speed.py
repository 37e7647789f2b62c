"""The benchmark's CPU smoke path (`python -m benchmarks.speed --quick`): keys, sane numbers."""

import json
from pathlib import Path

import pytest

from benchmarks.speed import forward_gflops_per_image, main

KEYS = {
    "device", "baseline_img_per_s", "project_img_per_s", "speedup", "model_gflops_per_img",
    "achieved_tflops", "mfu", "sample_ddpm_1000_img_per_s", "sample_ddpm_1000_seconds",
    "sample_ddim_img_per_s", "sample_ddim_steps",
    "default_run_minutes_extrapolated",
}  # fmt: skip


@pytest.mark.slow
def test_quick_bench_on_cpu_writes_every_key(tmp_path: Path) -> None:
    """--quick --device cpu prints and writes JSON with every documented key; throughputs and
    FLOPs are positive, speedup is their ratio, MFU and peak memory are null on a CPU, and
    --profile writes the profiler's table of the training steps (~25 s)."""
    out, profile = tmp_path / "bench" / "cpu.json", tmp_path / "bench" / "profile.txt"
    printed = main(["--quick", "--device", "cpu", "--json", str(out), "--profile", str(profile)])
    written = json.loads(out.read_text())
    assert written == printed and set(written) >= KEYS
    assert written["device"] == "cpu" and written["mfu"] is None
    assert written["project_peak_memory_gib"] is None
    assert "aten::convolution" in profile.read_text()
    for key in KEYS - {"device", "mfu"}:
        assert written[key] > 0, key
    ratio = written["project_img_per_s"] / written["baseline_img_per_s"]
    assert written["speedup"] == pytest.approx(ratio, rel=1e-2)


def test_flops_grow_with_the_square_of_the_width() -> None:
    """The U-Net's forward FLOPs (torch.utils.flop_counter) are dominated by convolutions whose
    cost grows with width squared: doubling hidden_size gives 3.5-4x the FLOPs."""
    ratio = forward_gflops_per_image(32, 32) / forward_gflops_per_image(16, 32)
    assert 3.5 < ratio < 4.0


def test_the_papers_network_costs_more_than_twice_the_assignments() -> None:
    """At base width 128 and 32 px, the DDPM paper's network (residual blocks, attention at
    16x16) counts 2-3x the forward FLOPs of the assignment's (12.4 against 5.35 GFLOP)."""
    ratio = forward_gflops_per_image(128, 32, "ddpm") / forward_gflops_per_image(128, 32)
    assert 2.0 < ratio < 3.0
