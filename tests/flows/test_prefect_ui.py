"""Pictures where people look: a run's newest sample grid, seen in the Prefect UI itself by
headless Chromium, against a real Prefect server that serves the UI (the session's test harness
serves none), the run started as a user starts it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from browser import CHROMIUM, Page, headless_page
from cli_run import REPO
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from run_records import flow_artifacts

from benchmarks.prefect_stack import clean_env, prefect_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (apt-get install chromium)"),
]

# The <img> whose src is `src`, once loaded: its size, whether it takes room on the page, and its
# pixels as the browser decoded them (drawn on a canvas: RGBA, row by row).
SHOWN = """(() => {
  const img = [...document.images].find(i => i.getAttribute('src') === %s);
  if (!img || !img.complete || !img.naturalWidth) return null;
  const canvas = Object.assign(document.createElement('canvas'),
                               {width: img.naturalWidth, height: img.naturalHeight});
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  const box = img.getBoundingClientRect();
  return {width: img.naturalWidth, height: img.naturalHeight, shown: box.width * box.height > 0,
          rgba: Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)};
})()"""


def link_to(path_end: str) -> str:
    """An expression: the href of the page's first link whose address ends with path_end."""
    return f"document.querySelector('a[href$={json.dumps(path_end)}]')?.getAttribute('href')"


def assert_shows(page: Page, src: str, grid: Path) -> None:
    """The page shows an <img> of src with exactly the grid file's pixels."""
    seen = page.wait_for(SHOWN % json.dumps(src))
    with Image.open(grid) as image:
        expected = image.convert("RGBA")
    assert (seen["width"], seen["height"]) == expected.size and seen["shown"]
    assert bytes(seen["rgba"]) == expected.tobytes()


def train(tmp_path: Path, tiny: dict[str, Any], cli_env: Any, api: str) -> None:
    """`python flows/train_flow.py` (the tiny run: 2 epochs, a 4-image grid after each) against
    the server at api."""
    env = {**cli_env(tiny, harness=False), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": api}  # fmt: skip
    done = subprocess.run([sys.executable, str(REPO / "flows" / "train_flow.py")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow(seconds=60)
def test_the_newest_sample_grid_shows_in_the_prefect_ui(
    tmp_path: Path, tiny: dict[str, Any], cli_env
) -> None:
    """After a run, the flow run's Artifacts tab (the default UI, v2) links to the `samples`
    artifact, whose page lists the newest grid, whose page shows it as an image with exactly
    the pixels of samples/epoch_002.png; the v1 UI's artifact page shows it too."""
    with prefect_server(clean_env(tmp_path / "prefect-home"), tmp_path / "server.log") as api:
        train(tmp_path, tiny, cli_env, api)
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            (flow_run,) = client.read_flow_runs()
            artifacts = flow_artifacts(flow_run.id)
        assert "samples" in artifacts, f"no samples artifact, only {sorted(artifacts)}"
        samples = artifacts["samples"]
        (grid,) = Path(tiny["run.dir"]).glob("*/samples/epoch_002.png")
        src = "data:image/png;base64," + base64.b64encode(grid.read_bytes()).decode()
        newest = samples[-1]
        assert [a.type for a in samples] == ["image", "image"]  # one version per grid
        assert newest.data == src  # the PNG as saved: a 70 px grid is far under IMAGE_BYTES

        ui = api.removesuffix("/api")
        with headless_page(tmp_path) as page:
            page.goto(f"{ui}/v2/runs/flow-run/{flow_run.id}?tab=Artifacts")
            page.goto(ui + page.wait_for(link_to("/artifacts/key/samples")))
            page.goto(ui + page.wait_for(link_to(f"/artifacts/artifact/{newest.id}")))
            assert_shows(page, src, grid)
            page.goto(f"{ui}/artifacts/artifact/{newest.id}")  # the v1 UI
            assert_shows(page, src, grid)
