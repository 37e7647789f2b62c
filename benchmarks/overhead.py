"""Prefect's share of a training run's wall time, measured in one process.

    python -m benchmarks.overhead [--epochs 10] [--json PATH] [--group.field value ...]

The same run twice, from empty run folders: (a) through train_flow (every task, artifact and
state change), (b) as a plain loop of the same core calls the tasks make (Trainer.epoch, the
snapshot, the epoch checkpoint, the sample grid). Their difference is what orchestration
costs; a first, untimed flow run starts Prefect (the temporary server when PREFECT_API_URL is
unset) and loads the data, so neither timed run pays for that. W&B is disabled in both.

Without data settings, it trains on a generated folder of 512 random 32x32 images with a small
model on the CPU; pass flags (as for flows/train_flow.py) to measure any other run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ddpm.batches import TrainingData
from ddpm.build import build_or_resume
from ddpm.datasets import load_dataset, locate_dataset
from ddpm.generate import draw_samples
from ddpm.images import save_grid
from ddpm.run_dir import RunDir, save_epoch_checkpoint
from ddpm.trainer import Trainer
from flows.train_flow import train_flow
from settings import core_config, load_settings, parse_flags

# A run whose epochs take seconds on a CPU: 512 images, batch 64, hidden 32, T = 100.
SMALL_RUN = {
    "data.dataset": "folder",
    "model.hidden_size": 32,
    "diffusion.num_timesteps": 100,
    "train.batch_size": 64,
    "train.device": "cpu",
    "optim.warmup_steps": 10,
    "sample.num": 16,
    "sample.steps": 10,
}


def write_random_images(folder: Path, count: int = 512) -> Path:
    """count random 32x32 RGB PNGs in folder, from a fixed seed."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)
    for i, image in enumerate(images.numpy()):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


def plain_run(overrides: dict[str, Any]) -> float:
    """Seconds for the run's epochs as a plain loop of the calls train_flow's tasks make."""
    cfg = load_settings(overrides)
    config, run = core_config(cfg), RunDir(Path(cfg.run.dir) / "plain")
    data_path = locate_dataset(config.data)
    resolved = cfg.model_dump(mode="json")
    start = time.perf_counter()
    data = TrainingData(load_dataset(config, data_path), config)
    total_steps = data.steps_per_epoch * config.train.epochs
    state = build_or_resume(config, total_steps, run, resolved)
    trainer = Trainer(state, data, config.train, run)
    while state.epoch < config.train.epochs:
        result = trainer.epoch()
        save_epoch_checkpoint(state.snapshot(), run, config.train.keep)
        samples = draw_samples(state, config.sample, config.image_shape, config.train.seed)
        save_grid(samples, run.grid(result.epoch))
    return time.perf_counter() - start


def flow_run(overrides: dict[str, Any]) -> float:
    """Seconds for the whole train_flow call."""
    start = time.perf_counter()
    train_flow(overrides)
    return time.perf_counter() - start


def measure(overrides: dict[str, Any], epochs: int, workdir: Path) -> dict[str, Any]:
    """Time a warm-up flow run (1 epoch), then the flow and the plain loop alternately (2 each),
    each from an empty run folder; returns the medians and Prefect's share."""
    base = {"wandb.mode": "disabled", **overrides, "train.epochs": epochs}
    flow_run({**base, "train.epochs": 1, "run.dir": str(workdir / "warm-up")})
    flows, plains = [], []
    for i in range(2):
        flows.append(flow_run({**base, "run.dir": str(workdir / f"flow-{i}")}))
        plains.append(plain_run({**base, "run.dir": str(workdir / f"plain-{i}")}))
    flow_s, plain_s = sorted(flows)[0], sorted(plains)[0]  # best of 2: least disturbed
    return {
        "epochs": epochs,
        "flow_seconds": [round(s, 3) for s in flows],
        "plain_seconds": [round(s, 3) for s in plains],
        "epoch_seconds_plain": round(plain_s / epochs, 3),
        "overhead_seconds_per_epoch": round((flow_s - plain_s) / epochs, 3),
        "prefect_share": round((flow_s - plain_s) / flow_s, 4),
        "peak_cuda_memory_gib": (
            round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if torch.cuda.is_initialized()
            else None
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args, flags = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = parse_flags(flags, prog="python -m benchmarks.overhead")
    with tempfile.TemporaryDirectory(prefix="ddpm-overhead-") as tmp:
        workdir = Path(tmp)
        if not any(key.startswith("data.") for key in overrides):
            folder = write_random_images(workdir / "images")
            overrides = {**SMALL_RUN, "data.folder": str(folder), **overrides}
        results = measure(overrides, args.epochs, workdir)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
