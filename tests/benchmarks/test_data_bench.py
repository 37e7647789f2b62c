"""benchmarks/data.py (issue 36) runs end to end at tiny sizes: every section reports, with
the preparation's re-run and its rate per core. Speeds are not asserted here (a benchmark, not
a timed test); that the two paths give the same batches is tests/ddpm/test_prepare.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import data as bench


@pytest.mark.slow(seconds=25)
def test_the_data_benchmark_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    assert bench.main(["--images", "12", "--big-images", "2", "--startup", "50",
                       "--memory-limit-mb", "0", "--json", str(out)]) == 0  # fmt: skip
    results = json.loads(out.read_text())
    sizes = [row["png_px"] for row in results["throughput"]]
    assert sizes == [256, 1024]
    for row in results["throughput"]:
        assert row["folder_img_s"] > 0 and row["prepared_memory_mapped_img_s"] > 0
        assert row["rerun_s"] >= 0 and row["prepare_img_s_per_core"] > 0
        assert row["first_epoch_auto_s"] > 0 and row["epoch_off_s"] > 0
    startup = results["startup"]
    assert startup["images"] == 50 and startup["prepared_first_batch_s"] > 0
    assert startup["auto_first_use_s"] > 0 and startup["auto_reuse_check_s"] >= 0
    assert results["bigger_than_memory"] == {"skipped": "--memory-limit-mb 0"}
