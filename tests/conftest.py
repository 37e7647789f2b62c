"""Fixtures shared by every test: tiny datasets in the official formats, a loopback server."""

from __future__ import annotations

import functools
import http.server
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from inception_weights import write_random_inception_weights
from tiny_run import make_config, write_cifar10

from ddpm.config import Config
from ddpm.evaluation import INCEPTION_FILE

# One intra-op thread: with another process on the same two cores, torch's default of one
# thread per core made a small forward pass 50x slower (../shared/ENVIRONMENT.md). The
# variable carries the choice to the runs the tests start as child processes.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-report", metavar="PATH", default=None,
        help="append a line per test to PATH: wall seconds, CPU seconds of the test process, "
        "CPU seconds of the child processes it waited for, worker, node id (tab-separated)",
    )  # fmt: skip


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """With --cpu-report: where the suite's CPU goes, test by test (setup and teardown
    included). A child's CPU counts where it is reaped: a module's or the session's server
    counts in the test that tears it down."""
    path = item.config.getoption("--cpu-report")
    if not path:
        yield
        return
    own, children = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    yield
    line = (f"{time.monotonic() - start:.2f}\t{_cpu_seconds(resource.RUSAGE_SELF) - own:.2f}\t"
            f"{_cpu_seconds(resource.RUSAGE_CHILDREN) - children:.2f}\t"
            f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}\t{item.nodeid}\n")  # fmt: skip
    with open(item.config.invocation_params.dir / path, "a") as report:  # tests chdir
        report.write(line)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject.toml): one worker more than there are cores. The end-to-end tests
    spend much of their time waiting on the servers, workers and runs they start, which left
    a third of two cores idle with one worker per core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) + 1  # sched_getaffinity: the cores this process may use (Linux)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first (`slow(seconds=N)`, then other slow ones), so that pytest-xdist
    starts them at once on separate workers instead of leaving one to run alone at the end.

    The tests of one module stay together, in their order (a module-scoped fixture is torn
    down when another module's test runs between two of its tests), and a module goes where
    its costliest test would; the order is otherwise the collection's.
    """

    def cost(item: pytest.Item) -> float:
        marker = item.get_closest_marker("slow")
        return 0.0 if marker is None else -float(marker.kwargs.get("seconds", 1.0))

    def shares_fixtures(item: pytest.Item) -> bool:
        return item.get_closest_marker("xdist_group") is not None

    unit = {id(i): i.module.__name__ if shares_fixtures(i) else i.nodeid for i in items}
    unit_cost: dict[str, float] = {}
    for item in items:
        unit_cost[unit[id(item)]] = min(unit_cost.get(unit[id(item)], 0.0), cost(item))
    first = {name: n for n, name in reversed(list(enumerate(unit[id(i)] for i in items)))}
    items.sort(key=lambda i: (unit_cost[unit[id(i)]], first[unit[id(i)]]))


@pytest.fixture
def tiny_config() -> Callable[..., Config]:
    """tiny_config(changes=None) -> the Config of a tiny CPU run (see TINY), changed."""
    return make_config


class _Payload:
    """Pickles to a call of os.system: unpickling it would run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture
def plant_pickle() -> Callable[[Path, Path], Path]:
    """plant_pickle(path, marker) writes a torch file at path whose unpickling would create
    `marker`: a hostile checkpoint."""

    def plant(path: Path, marker: Path) -> Path:
        torch.save({"model": _Payload(f"touch {marker}")}, path)
        return path

    return plant


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random Inception weights in the official file's layout (no download), written once per
    session (per pytest-xdist worker): 96 MB."""
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


@pytest.fixture
def cifar_writer() -> Callable[..., Path]:
    """write_cifar10(root, images_per_batch=8, seed=0) -> the extracted folder."""
    return write_cifar10


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test runs without the developer's DDPM_* variables, in a folder of its own (so
    no stray .env is read and relative paths land in tmp_path)."""
    for name in list(os.environ):
        if name.upper().startswith("DDPM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A static file server on 127.0.0.1 (free port) over a fresh folder: (base URL, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# Hypothesis profiles (issue 34, bad input by the thousand). `ci`, the default, tries a few hundred
# cases per kind, the same ones on every run (derandomized, no example database); `pytest
# --hypothesis-profile=thorough` tries 10,000 per kind, new ones each time. Registered here, at
# import, so that the plugin's --hypothesis-profile (read after conftest files load) wins.
def _register_hypothesis_profiles() -> None:
    from hypothesis import settings as hypothesis_settings

    hypothesis_settings.register_profile(
        "ci", max_examples=200, deadline=None, database=None, derandomize=True
    )
    hypothesis_settings.register_profile(
        "thorough", max_examples=10_000, deadline=None, database=None
    )
    hypothesis_settings.load_profile("ci")


_register_hypothesis_profiles()
