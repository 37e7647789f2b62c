"""`python -m benchmarks.overhead`: the same run through train_flow and as a plain loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.overhead import main


@pytest.mark.slow
def test_overhead_compares_the_flow_with_the_plain_loop(tmp_path: Path) -> None:
    """It times 2 flow runs and 2 plain loops of the same small run, each training every
    epoch from scratch, and reports Prefect's share as (flow - plain) / flow of the best of
    each; the JSON file holds what it printed (~30 s on 2 CPUs)."""
    out = tmp_path / "overhead.json"
    flags = ["--model.hidden_size", "16", "--diffusion.num_timesteps", "20"]
    printed = main(["--epochs", "1", "--json", str(out), *flags])
    assert json.loads(out.read_text()) == printed
    assert len(printed["flow_seconds"]) == len(printed["plain_seconds"]) == 2
    assert all(s > 0 for s in printed["flow_seconds"] + printed["plain_seconds"])
    flow_s, plain_s = min(printed["flow_seconds"]), min(printed["plain_seconds"])
    assert printed["prefect_share"] == pytest.approx((flow_s - plain_s) / flow_s, abs=1e-3)
    assert printed["epoch_seconds_plain"] == pytest.approx(plain_s, abs=1e-3)
