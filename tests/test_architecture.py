"""The layers hold (import-linter's contracts in pyproject.toml): deployments over flows over
settings over the core; the core imports no Prefect, W&B or pydantic; nothing imports
benchmarks/; no module imports another of its package in a circle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_linter_keeps_every_contract() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "4 kept, 0 broken" in done.stdout, done.stdout[-2000:]


def test_no_module_of_the_product_runs_past_400_lines() -> None:
    """One job per module: no module of ddpm/, flows/ or settings/ is over 400 lines (a module
    that grows past it is split by job, as issue 37 split data.py, config.py and sweep_flow.py)."""
    long = {
        str(p.relative_to(REPO)): n
        for package in ("ddpm", "flows", "settings")
        for p in (REPO / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long
