"""Data at the GPU's speed (issue 36): today's image-folder path against a prepared dataset,
side by side in one run, and the prepared path's start-up, memory bound and preparation speed.

    python -m benchmarks.data [--images 2000] [--big-images 200] [--startup 100000]
                              [--memory-limit-mb 1024] [--json PATH]

1. Delivered images per second at 32 px, one epoch of TrainingData.epoch (the batches the
   training step takes, normalised and flipped), from PNGs of 256 px (--images of them) and of
   1,024 px (--big-images): the folder path (data.dataset=folder, data.num_workers at its
   default) against the same files prepared (ddpm-prepare's default workers), held in memory
   and read memory-mapped. Ratios are against the folder path in the same run.
2. Preparing: images per second and per core; a re-run with nothing changed (seconds); a
   run's first epoch with data.prepare=auto (preparing, then an epoch in memory) against
   one epoch with off (the folder path).
3. Start-up: a fresh process from its start to the first batch, on a prepared dataset of
   --startup 32-px images, against the folder path's on as many PNGs; data.prepare=auto's
   first use of that folder (its preparation) and a later run's check that it is unchanged.
4. Bigger than memory: one epoch of training batches (batch 128) from a prepared dataset 4x a
   memory limit set for the process (a cgroup v1 memory controller: root, Linux), a tiny
   network (CPU) taking a training step on every 100th (all of them would take 1.5 hours
   here); its peak memory and whether it finished. Skipped, saying why, where no cgroup can
   be made.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.batches import TrainingData
from ddpm.config import Config
from ddpm.datasets import prepared_dataset
from ddpm.image_folders import ImageFolderDataset
from ddpm.prepare import prepare, prepare_folder
from ddpm.prepared import shard_name, write_manifest, write_shard
from ddpm.sources import find_source

REPO = Path(__file__).resolve().parents[1]
CGROUP = Path("/sys/fs/cgroup/memory")


def write_pngs(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """count smooth RGB PNGs of size x size px (bicubic-upsampled 8x8 noise), seeded."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((size, size), Image.BICUBIC).save(folder / f"{i:06d}.png")
    return folder


def config_for(dataset: str, folder: Path) -> Config:
    """The core Config of a run on `folder` at 32 px, batch 128, every other setting default."""
    from settings import core_config, load_settings

    return core_config(load_settings({"data.dataset": dataset, "data.folder": str(folder),
                                      "train.device": "cpu"}, env_file=None))  # fmt: skip


def epoch_rate(data: TrainingData, min_seconds: float = 1.0) -> float:
    """Images per second TrainingData delivers, over whole epochs (at least min_seconds)."""
    images, epoch, start = 0, 1, time.perf_counter()
    while True:
        for batch in data.epoch(epoch):
            images += batch.shape[0]
        epoch += 1
        if time.perf_counter() - start >= min_seconds:
            return images / (time.perf_counter() - start)


def throughput(work: Path, size: int, count: int) -> dict[str, Any]:
    """Section 1 and 2 for count PNGs of size px."""
    folder = write_pngs(work / f"png{size}", count, size)
    out = work / f"prepared{size}"
    cores = len(os.sched_getaffinity(0))
    started = time.perf_counter()
    prepare(find_source(folder), out, 32)
    prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    prepare(find_source(folder), out, 32)
    rerun_s = time.perf_counter() - started
    folder_data = TrainingData(ImageFolderDataset(folder, 32), config_for("folder", folder))
    folder_rate = epoch_rate(folder_data, min_seconds=0.0)
    folder_data.close()
    rates = {}
    for name, fraction in (("in memory", 1.0), ("memory-mapped", 0.0)):
        images = prepared_dataset(out, 32, 3, memory_fraction=fraction)
        rates[name] = epoch_rate(TrainingData(images, config_for("prepared", out)))
    return {
        "png_px": size, "images": count, "cores": cores,
        "folder_img_s": round(folder_rate, 1),
        **{f"prepared_{k.replace(' ', '_').replace('-', '_')}_img_s": round(v, 1)
           for k, v in rates.items()},
        **{f"ratio_{k.replace(' ', '_').replace('-', '_')}": round(v / folder_rate, 1)
           for k, v in rates.items()},
        "prepare_s": round(prepare_s, 2),
        "prepare_img_s": round(count / prepare_s, 1),
        "prepare_img_s_per_core": round(count / prepare_s / cores, 1),
        "rerun_s": round(rerun_s, 3),
        # data.prepare: a run's first epoch with auto (prepare, then an epoch from memory)
        # against off (an epoch of the folder path); later epochs are the rates above.
        "first_epoch_auto_s": round(prepare_s + count / rates["in memory"], 2),
        "epoch_off_s": round(count / folder_rate, 2),
    }  # fmt: skip


FIRST_BATCH = """
import sys, time
start = time.perf_counter()
from benchmarks.data import config_for
from ddpm.batches import TrainingData
from ddpm.datasets import load_dataset
config = config_for(sys.argv[1], sys.argv[2])
data = TrainingData(load_dataset(config, sys.argv[2]), config)
next(iter(data.epoch(1)))
print(time.perf_counter() - start)
"""


def first_batch_seconds(dataset: str, folder: Path) -> float:
    """A fresh python process's seconds from its first line to its first batch."""
    done = subprocess.run([sys.executable, "-c", FIRST_BATCH, dataset, str(folder)], cwd=REPO,
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


def synthetic_prepared(out: Path, count: int, shard: int = 4096) -> Path:
    """A prepared dataset of count random 32-px images written directly (no PNGs)."""
    out.mkdir(parents=True, exist_ok=True)
    rng, shards = np.random.default_rng(0), []
    n_shards = -(-count // shard)
    for i in range(n_shards):
        n = min(shard, count - i * shard)
        name = shard_name(i, n_shards)
        pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        shards.append({"file": name, "count": n, "sha256": write_shard(out / name, pixels)})
    write_manifest(out, (3, 32, 32), shards, source={"kind": "synthetic", "images": count})
    return out


def startup(work: Path, count: int) -> dict[str, Any]:
    """Section 3."""
    prepared = synthetic_prepared(work / "startup-prepared", count)
    folder = work / "startup-png"
    write_pngs(folder, count, 32)
    started = time.perf_counter()
    prepare_folder(folder, work / "startup-cache", 32)
    first_use_s = time.perf_counter() - started
    started = time.perf_counter()
    prepare_folder(folder, work / "startup-cache", 32)
    reuse_s = time.perf_counter() - started
    return {
        "images": count,
        "prepared_first_batch_s": round(first_batch_seconds("prepared", prepared), 2),
        "folder_first_batch_s": round(first_batch_seconds("folder", folder), 2),
        # data.prepare=auto on the PNG folder: the first run prepares it; a later run only
        # checks its fingerprint (the files' names, sizes and times) before reading the copy.
        "auto_first_use_s": round(first_use_s, 2),
        "auto_reuse_check_s": round(reuse_s, 2),
    }


TRAIN_EPOCH = """
import sys, torch
torch.set_num_threads(1)
from benchmarks.data import config_for
from ddpm.build import build_training
from ddpm.batches import TrainingData
from ddpm.datasets import prepared_dataset
from ddpm.trainer import train_step
import dataclasses
config = config_for("prepared", sys.argv[1])
config = dataclasses.replace(config, model=dataclasses.replace(config.model, hidden_size=8))
data = TrainingData(prepared_dataset(sys.argv[1], 32, 3), config)
state = build_training(config, data.steps_per_epoch)
for i, x0 in enumerate(data.epoch(1)):
    if i % TRAIN_EVERY == 0:
        train_step(state, x0)
print("epoch done", i + 1, "batches", i // TRAIN_EVERY + 1, "steps")
"""
TRAIN_EVERY = 100  # a CPU trains 250 img/s: every batch of a 4 GB epoch would take 1.5 h


def bigger_than_memory(work: Path, limit_mb: int) -> dict[str, Any]:
    """Section 4: one training epoch in a cgroup of limit_mb over 4x that much data."""
    if limit_mb <= 0:
        return {"skipped": "--memory-limit-mb 0"}
    if not (CGROUP / "memory.limit_in_bytes").is_file() or os.geteuid() != 0:
        return {"skipped": f"no cgroup v1 memory controller writable here ({CGROUP})"}
    count = 4 * limit_mb * 2**20 // (3 * 32 * 32)
    data = synthetic_prepared(work / "big", count)
    group = CGROUP / f"ddpm-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_mb * 2**20))
        command = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"',
                   sys.executable, "-c", TRAIN_EPOCH.replace("TRAIN_EVERY", str(TRAIN_EVERY)),
                   str(data)]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        return {
            "limit_mb": limit_mb, "dataset_mb": round(count * 3072 / 2**20), "images": count,
            "finished": done.returncode == 0 and "epoch done" in done.stdout,
            "peak_mb": round(peak / 2**20), "seconds": round(time.perf_counter() - started, 1),
            "said": (done.stdout + done.stderr).strip()[-300:] or f"exit {done.returncode}",
        }  # fmt: skip
    finally:
        group.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="256-px PNGs")
    parser.add_argument("--big-images", type=int, default=200, help="1,024-px PNGs")
    parser.add_argument("--startup", type=int, default=100_000, help="images for start-up")
    parser.add_argument("--memory-limit-mb", type=int, default=1024, help="0: skip section 4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ddpm-data-bench-") as tmp:
        work = Path(tmp)
        results = {
            "throughput": [throughput(work, 256, args.images),
                           throughput(work, 1024, args.big_images)],
            "startup": startup(work, args.startup),
            "bigger_than_memory": bigger_than_memory(work, args.memory_limit_mb),
        }  # fmt: skip
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
