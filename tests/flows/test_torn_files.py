"""Every file a run, a sample folder, an export and a sweep leave, torn (issue 34): emptied,
truncated at a random byte, bit-flipped or replaced by a file of another type, then the command
that reads it next runs. Each case either recovers from what else is on disk (and ends as the
same command does on the undamaged copy) or ends with a user error naming the file in one line
and every file left as it was: never a traceback, never a changed good file.

Which damage each file gets is seeded; TORN_FILES=all tears every file all four ways (about
four times as long)."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_run import tiny_overrides

from ddpm.errors import UserError
from ddpm.files import write_checked
from ddpm.run_dir import RunDir
from flows.export_flow import export_flow
from flows.sample_flow import sample_flow
from flows.sweep_flow import local_runner, sweep_flow
from flows.train_flow import train_flow
from settings.sampling import GenerateOptions

# One worker builds the module's products once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("torn-files")

KINDS = ("empty", "truncated", "bit-flipped", "other-type")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))  # what a JSON file is replaced with

# The files each product leaves (W&B's own folder aside: W&B writes a new run folder on resume
# and no command reads the old ones). The test fails when a product leaves another file, so a
# new file is torn too.
RUN_FILES = [
    "settings.json", "settings.json.sha256", "lock", "wandb_id.txt", "wandb_id.txt.sha256",
    "metrics.jsonl", "metrics.jsonl.sha256",
    "checkpoints/epoch_001.pt", "checkpoints/epoch_001.pt.sha256",
    "checkpoints/epoch_002.pt", "checkpoints/epoch_002.pt.sha256",
    "checkpoints/best.pt", "checkpoints/best.pt.sha256", "checkpoints/best.json",
    "checkpoints/best.json.sha256",
    "samples/epoch_001.png", "samples/epoch_002.png",
]  # fmt: skip
SAMPLE_FILES = ["generation.json", "generation.json.sha256", "000000.png", "000001.png",
                "000002.png", "000003.png", "samples_4x32x32x3.npz"]  # fmt: skip
EXPORT_FILES = [".ddpm-export.json", "README.md", "model_index.json",
                "scheduler/scheduler_config.json", "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors", "unet/assignment_unet.py"]  # fmt: skip
SWEEP_FILES = ["sweep.json", "sweep.json.sha256", "lock", "trials.log", "metric.png",
               "wandb_id.txt", "wandb_id.txt.sha256"]  # fmt: skip


def damage(path: Path, kind: str, rng: random.Random) -> None:
    """Tear path one of the KINDS ways (a file of another type: a PNG for text, JSON for the
    rest)."""
    data = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: rng.randrange(max(1, len(data)))])
    elif kind == "bit-flipped":
        flipped = bytearray(data or b"\x00")
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
    else:
        texts = (".json", ".jsonl", ".txt", ".sha256", ".md", ".py", ".log", "")
        path.write_bytes(PNG if path.suffix in texts else b'{"epoch": 1, "model": null}\n')


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def cases(product: str, files: list[str]) -> list[Any]:
    """(product, file, kind) for each file: one seeded kind each, or every kind with
    TORN_FILES=all."""
    every = os.environ.get("TORN_FILES") == "all"
    return [pytest.param(product, name, kind, id=f"{product}:{name}:{kind}")
            for i, name in enumerate(files)
            for kind in (KINDS if every else [KINDS[(i + len(product)) % len(KINDS)]])]  # fmt: skip


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> dict[str, Any]:
    """A tiny deterministic run (2 epochs, FID after the second, W&B offline), 4 images drawn
    from it (with the .npz), its export, and a one-trial sweep served from this machine,
    each in a folder of its own."""
    root = tmp_path_factory.mktemp("products")
    tiny = tiny_overrides(root)
    base = {
        **tiny, "train.deterministic": True, "wandb.mode": "offline", "eval.every": 2,
        "eval.num_samples": 4, "eval.batch_size": 4, "eval.metrics": "fid",
        "eval.weights": str(weights), "eval.cache_dir": str(root / "fid-stats"),
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.upper().startswith("DDPM_")]:
            patch.delenv(name)
        patch.chdir(root)
        state = train_flow(overrides=base, return_state=True)
        assert state.is_completed(), state.message
        run = Path(state.result()["run_dir"])
        options = {"run": run, "num": 4, "out": root / "images", "steps": 3, "npz": True}
        drawn = sample_flow(GenerateOptions(**options), return_state=True)
        assert drawn.is_completed(), drawn.message
        exported = export_flow(str(run), str(root / "export"), return_state=True)
        assert exported.is_completed(), exported.message
        spec = root / "sweep.yaml"
        spec.write_text(yaml.safe_dump({
            "name": "torn", "deployment": "train-flow/ddpm-smoke", "vary": {"optim.lr": [1e-3]},
            "base": {"data.root": tiny["data.root"], "data.subset": 64, "run.dir": str(root),
                     "train.epochs": 1, "wandb.mode": "offline"},
        }))  # fmt: skip
        log = root / "sweeps" / "torn" / "trials.log"
        with local_runner("train-flow/ddpm-smoke", 1, 120, log):
            swept = sweep_flow(str(spec), poll_seconds=0.5, return_state=True)
        assert swept.is_completed(), swept.message
    return {"root": root, "base": base, "run": run, "images": root / "images",
            "export": root / "export", "sweep": root / "sweeps" / "torn", "spec": spec}  # fmt: skip


def test_the_products_leave_the_files_the_test_tears(products: dict[str, Any]) -> None:
    """The files each product leaves are exactly those torn below (W&B's own folder and a
    sweep's trial run folders, which are runs, aside)."""

    def files(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
        return sorted(name for name in snapshot(folder)
                      if not name.startswith(("wandb/", *skip)))  # fmt: skip

    assert files(products["run"]) == sorted(RUN_FILES)
    assert files(products["images"]) == sorted(SAMPLE_FILES)
    assert files(products["export"]) == sorted(EXPORT_FILES)
    assert files(products["sweep"], ("trial-",)) == sorted(SWEEP_FILES)


def next_command(product: str, name: str, products: dict[str, Any], copy: Path) -> Callable:
    """What reads the file next, on the copy: a run resumes for one more epoch (evaluating
    when best.* is torn, whose next reader is the evaluation; best.pt is read by sampling
    from it), images are drawn again with the .npz, an export is sampled from, a sweep is
    run again."""
    if product == "run":
        run = copy / products["run"].name
        if name.startswith("checkpoints/best.pt"):
            options = {"run": run / "checkpoints" / "best.pt", "num": 2, "out": copy / "drawn"}
            return lambda: sample_flow(GenerateOptions(**options), return_state=True)
        overrides = {**products["base"], "run.dir": str(copy), "train.epochs": 3,
                     "eval.every": 3 if name.startswith("checkpoints/best") else 0}  # fmt: skip
        return lambda: train_flow(overrides=overrides, return_state=True)
    if product == "images":
        options = {"run": products["run"], "num": 4, "out": copy, "steps": 3, "npz": True}
        return lambda: sample_flow(GenerateOptions(**options), return_state=True)
    if product == "export":
        options = {"run": copy, "num": 2, "out": copy.parent / "drawn", "steps": 3}
        return lambda: sample_flow(GenerateOptions(**options), return_state=True)
    spec = yaml.safe_load(products["spec"].read_text())
    spec["base"]["run.dir"] = str(copy.parent.parent)
    return lambda: sweep_flow(spec, poll_seconds=0.5, return_state=True)


def place(product: str, products: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the product where its command finds it: the run folder under a runs folder
    of its own; a sweep at <run.dir>/sweeps/<name>."""
    source = products[product]
    if product == "run":
        copy = tmp_path / "runs"
        shutil.copytree(source, copy / source.name)
        return copy
    copy = tmp_path / "sweeps" / "torn" if product == "sweep" else tmp_path / product
    shutil.copytree(source, copy)
    if product == "sweep":  # moved: its record names the spec's run.dir, now the copy's
        record = json.loads((copy / "sweep.json").read_text())
        record["spec"]["base"]["run.dir"] = str(tmp_path)
        write_checked(copy / "sweep.json", json.dumps(record, indent=1))
    return copy


@pytest.fixture(scope="module")
def controls(products: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What each next command does on an undamaged copy: its state's result."""
    done = {}
    for product, name in [("run", "metrics.jsonl"), ("run", "checkpoints/best.json")]:
        copy = place(product, products, tmp_path_factory.mktemp("control"))
        state = next_command(product, name, products, copy)()
        assert state.is_completed(), state.message
        run = RunDir(copy / products["run"].name)
        done[name] = (run.metrics_rows(), weights(run))
    return done


def weights(run: RunDir) -> dict[str, torch.Tensor]:
    """The final model and EMA weights of a run (its epoch 3 checkpoint)."""
    state = torch.load(run.epoch_checkpoint(3), weights_only=True)
    return {**state["model"], **{f"ema.{k}": v for k, v in state["ema"].items()}}


def same_rows(rows: list[dict], control: list[dict], fid: bool) -> bool:
    """The rows of the same epochs with the same losses, steps and lr (timings aside), and
    FID if asked (an epoch trained again where its checkpoint was torn is not evaluated)."""
    keys = ("epoch", "loss", "global_step", "lr", *(("fid",) if fid else ()))
    return [{k: r.get(k) for k in keys} for r in rows] == [
        {k: r.get(k) for k in keys} for r in control
    ]


@pytest.mark.slow(seconds=200)
@pytest.mark.parametrize(
    ("product", "name", "kind"),
    cases("run", RUN_FILES)
    + cases("images", SAMPLE_FILES)
    + cases("export", EXPORT_FILES)
    + cases("sweep", SWEEP_FILES),
)
def test_a_torn_file_is_recovered_or_named_in_one_line(
    product: str, name: str, kind: str, products: dict, controls: dict, tmp_path: Path
) -> None:
    """The command that next reads the torn file recovers (a resumed run ends with the
    weights and metrics of the undamaged run's resume) or fails with a one-line user error
    naming the file, with every file as it was."""
    copy = place(product, products, tmp_path)
    folder = copy / products["run"].name if product == "run" else copy
    damage(folder / name, kind, random.Random(f"{product}:{name}:{kind}"))
    before = snapshot(folder)
    state = next_command(product, name, products, copy)()
    if state.is_completed():
        if product == "run" and not name.startswith("checkpoints/best.pt"):
            run = RunDir(folder)
            evaluated = name.startswith("checkpoints/best")
            rows, control = controls["checkpoints/best.json" if evaluated else "metrics.jsonl"]
            assert same_rows(run.metrics_rows(), rows, fid=evaluated)
            final = weights(run)
            assert all(torch.equal(final[k], v) for k, v in control.items())
        return
    error = state.result(raise_on_failure=False)
    assert isinstance(error, UserError), f"{type(error).__name__}: {error}"
    message = str(error)
    assert "\n" not in message and name.rsplit("/", 1)[-1] in message, message
    assert snapshot(folder) == before
