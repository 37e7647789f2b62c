"""Peak memory of one training step of the paper's network, whole, in micro-batches
(train.accumulate) and with activation checkpointing (model.checkpointing).

    python benchmarks/memory.py [--size 128] [--batch 16] [--hidden 64] [--device cpu|cuda]

Each variant runs in a fresh process (the project's train_step, fp32 on the CPU, bf16 on
CUDA): on CUDA the peak of torch.cuda.max_memory_allocated over a second step; on a CPU the
growth of the process's peak resident memory (ru_maxrss) over its first step, which counts
the activations, the gradients and Adam's state (the same for every variant), and is
coarser.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

VARIANTS = {  # name: (accumulate, checkpointing)
    "whole batch": (1, False),
    "accumulate 4": (4, False),
    "checkpointing": (1, True),
    "accumulate 4 + checkpointing": (4, True),
}


def measure(size: int, batch: int, hidden: int, accumulate: int, checkpointing: bool,
            device: str) -> dict[str, float]:  # fmt: skip
    """One step in this process; returns the peak memory it added, in MiB, and its time."""
    import time

    import torch

    from ddpm.build import build_diffusion
    from ddpm.config import DiffusionConfig, ModelConfig, OptimConfig
    from ddpm.trainer import train_step
    from ddpm.training import TrainingState, build_optimizer

    torch.manual_seed(0)
    model = ModelConfig(arch="ddpm", hidden_size=hidden, checkpointing=checkpointing)
    diffusion = build_diffusion(model, DiffusionConfig(), size).to(device)
    optimizer = build_optimizer(diffusion.parameters(), OptimConfig())
    state = TrainingState(diffusion, optimizer, precision="bf16" if device == "cuda" else "fp32")
    x0 = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    if device == "cuda":  # kernels and the optimizer's state settle; the CPU's peak is the first
        train_step(state, x0, parts=accumulate)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    train_step(state, x0, parts=accumulate).loss.item()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_mib": peak / 2**20, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a variant, in a child process
    args = parser.parse_args(argv)
    if args.one:
        accumulate, checkpointing = VARIANTS[args.one]
        result = measure(args.size, args.batch, args.hidden, accumulate, checkpointing,
                         args.device)  # fmt: skip
        print(json.dumps(result))
        return
    print(f"{args.size} px, batch {args.batch}, hidden {args.hidden}, {args.device}:")
    for name in VARIANTS:
        child = [sys.executable, __file__, *(argv or sys.argv[1:]), "--one", name]
        result = json.loads(subprocess.run(child, check=True, capture_output=True).stdout)
        print(f"  {name:30s} peak {result['peak_mib']:8.0f} MiB  step {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
