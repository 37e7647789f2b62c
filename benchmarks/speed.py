"""Training and sampling throughput: the seed pipeline against this project's, in one run.

    python -m benchmarks.speed [--device cuda] [--json results.json]
    python -m benchmarks.speed --quick --device cpu      # a CPU smoke run in under a minute

(a) baseline, the course assignment's pipeline with its bugs fixed: a torchvision DataLoader
    decoding PIL images with RandomHorizontalFlip/ToTensor/Normalize in worker processes, fp32
    eager, plain Adam, a host-to-device copy and loss.item() every step;
(b) project: the real training path (ddpm.trainer.Trainer) with device-resident data, step
    metrics read every 100 steps (no host sync in between), and, on CUDA, bf16 autocast,
    fused Adam, channels-last and torch.compile.
Sampling: the 1000-step ancestral sampler with compiled steps on CUDA (CUDA graphs), and the
DDIM grid eager with the default sample.steps (100), as the default run draws it each epoch.
--profile PATH also writes torch.profiler's table of the project's training steps.
Same model, batch size, dataset size and device; both warmed up before timing. Only torch and
torchvision are needed, so it runs on a GPU machine without the rest of the project.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from ddpm.batches import TrainingData
from ddpm.build import build_network, build_training
from ddpm.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)
from ddpm.datasets import TensorImageDataset
from ddpm.diffusion import DiffusionModel
from ddpm.trainer import Trainer
from ddpm.training import autocast, resolve_device, resolve_precision

CIFAR10_TRAIN_IMAGES = 50_000
DEFAULT_EPOCHS = 100
READ_EVERY = 100  # train.log_every's default: steps between reads of the step metrics
# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's datasheets (SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}


class PILImages(Dataset):
    """CIFAR-style uint8 images served as PIL images through transforms, like torchvision's
    CIFAR10 dataset in the seed pipeline."""

    def __init__(self, images: torch.Tensor, transform: Any) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def network(hidden: int, arch: str = "assignment", image_size: int = 32) -> torch.nn.Module:
    """The U-Net of `arch` (assignment or ddpm, the paper's CIFAR-10 settings) at base width
    `hidden`."""
    return build_network(ModelConfig(hidden_size=hidden, arch=arch), image_size)  # type: ignore[arg-type]


def baseline_img_per_s(
    images: torch.Tensor,
    hidden: int,
    batch: int,
    device: torch.device,
    workers: int,
    steps: int,
    arch: str = "assignment",
) -> float:
    """Images/s of the seed pipeline over `steps` steps after a warm-up epoch's worth."""
    from torchvision import transforms

    torch.manual_seed(0)
    model = DiffusionModel(network(hidden, arch), num_timesteps=1000).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    transform = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    loader = DataLoader(
        PILImages(images, transform),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        multiprocessing_context="forkserver" if workers else None,
        persistent_workers=workers > 0,
    )

    def run(n: int) -> int:
        done = 0
        while done < n:
            for x, _ in loader:
                x = x.to(device)
                optimizer.zero_grad()
                loss = model(x)
                loss.backward()
                optimizer.step()
                loss.item()  # the seed logged every step
                done += 1
                if done == n:
                    break
        return done

    run(max(2, steps // 4))  # warm-up: workers started, kernels chosen
    _sync(device)
    start = time.perf_counter()
    run(steps)
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def project_config(
    hidden: int,
    batch: int,
    device: torch.device,
    compile: bool | None = None,
    arch: str = "assignment",
) -> Config:
    """The project's training path as the default run takes it on `device` (compile: None =
    on for CUDA, as train.compile=auto)."""
    on_cuda = device.type == "cuda"
    return Config(
        data=DataConfig(loader="device"),
        model=ModelConfig(hidden_size=hidden, arch=arch),  # type: ignore[arg-type]
        optim=OptimConfig(warmup_steps=0),
        train=TrainConfig(
            batch_size=batch,
            device=str(device),
            log_every=READ_EVERY,
            precision=resolve_precision("auto", device),
            compile=on_cuda if compile is None else compile,
            fused=on_cuda,
        ),
    )


def project_img_per_s(
    images: torch.Tensor,
    hidden: int,
    batch: int,
    device: torch.device,
    steps: int,
    profile: Path | None = None,
    compile: bool | None = None,
    arch: str = "assignment",
) -> float:
    """Images/s of the project's training path over `steps` steps after a warm-up. With
    `profile`, a further `steps // 4` steps run under torch.profiler and its table (sorted by
    device time, or CPU time on a CPU) is written there."""
    config = project_config(hidden, batch, device, compile, arch)
    state = build_training(config, total_steps=10**9)

    def epoch(n: int) -> None:
        data = TrainingData(TensorImageDataset(images[: n * batch]), config)
        Trainer(state, data, config.train).epoch()
        _sync(device)

    epoch(max(2, steps // 4))  # warm-up: compilation, autotuning, allocator
    start = time.perf_counter()
    epoch(steps)
    seconds = time.perf_counter() - start
    if profile is not None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        on_cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        with profiler(activities=activities) as prof:
            epoch(max(2, steps // 4))
        sort = "cuda_time_total" if on_cuda else "cpu_time_total"
        profile.parent.mkdir(parents=True, exist_ok=True)
        profile.write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
    return steps * batch / seconds


def forward_gflops_per_image(hidden: int, image_size: int, arch: str = "assignment") -> float:
    """Forward FLOPs of the U-Net for one image, counted by torch.utils.flop_counter."""
    net = network(hidden, arch, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, 3, image_size, image_size), torch.ones(1))
    return counter.get_total_flops() / 1e9


def sampling_img_per_s(
    hidden: int,
    device: torch.device,
    num: int,
    ddpm_steps: int,
    ddim_steps: int,
    compile: bool,
    arch: str = "assignment",
) -> tuple[float, float]:
    """(ancestral sampler images/s at ddpm_steps, DDIM images/s at ddim_steps), from an
    untrained model (speed does not depend on the weights).

    The ancestral sampler runs as the project runs it: with compile, its network is compiled
    (a CUDA graph per call on CUDA). DDIM runs eager, as the default run's per-epoch grid does.
    """
    model = DiffusionModel(network(hidden, arch), num_timesteps=ddpm_steps).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    precision = resolve_precision("auto", device)  # bf16 on CUDA, as training runs

    def timed(fn: Any) -> float:
        with autocast(device.type, precision):
            fn()  # warm-up (and compilation)
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
        return num / (time.perf_counter() - start)

    ddpm = timed(lambda: model.sample(num, (3, 32, 32), generator=generator, compile=compile))
    ddim = timed(
        lambda: model.sample(num, (3, 32, 32), "ddim", steps=ddim_steps, generator=generator)
    )
    return ddpm, ddim


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU, else None (CPUs, unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    steps, batch, hidden = args.steps, args.batch_size, args.hidden
    images = torch.randint(
        0, 256, (max(steps, 8) * batch, 3, 32, 32), dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    arch = args.arch
    baseline = baseline_img_per_s(images, hidden, batch, device, args.workers, steps, arch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    project = project_img_per_s(images, hidden, batch, device, steps, args.profile, arch=arch)
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    train = project_config(hidden, batch, device, arch=arch).train
    grid_steps = SampleConfig().steps
    gflops = forward_gflops_per_image(hidden, 32, arch)
    params = sum(p.numel() for p in network(hidden, arch).parameters())
    achieved = 3 * gflops * project / 1e3  # forward + backward ~ 3x forward
    peak = peak_tflops(device)
    ddpm, ddim = sampling_img_per_s(
        hidden, device, args.sample_num, 1000, grid_steps, train.compile
    )
    epoch_s = CIFAR10_TRAIN_IMAGES / project + SampleConfig().num / ddim  # an epoch and its grid
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": str(torch.__version__),
        "quick": args.quick,
        "batch_size": batch,
        "arch": arch,
        "hidden_size": hidden,
        "model_params_m": round(params / 1e6, 3),
        "timed_steps": steps,
        "baseline_workers": args.workers,
        "project_precision": train.precision,
        "project_compiled": train.compile,
        "baseline_img_per_s": round(baseline, 1),
        "project_img_per_s": round(project, 1),
        "speedup": round(project / baseline, 3),
        "model_gflops_per_img": round(gflops, 4),
        "achieved_tflops": round(achieved, 4),
        "mfu": round(achieved / peak, 4) if peak else None,
        "project_peak_memory_gib": round(peak_memory, 3) if peak_memory is not None else None,
        "sample_num": args.sample_num,
        "sample_compiled": train.compile,
        "sample_ddpm_1000_img_per_s": round(ddpm, 3),
        "sample_ddpm_1000_seconds": round(args.sample_num / ddpm, 3),
        "sample_ddim_steps": grid_steps,
        "sample_ddim_img_per_s": round(ddim, 3),
        "default_run_minutes_extrapolated": round(DEFAULT_EPOCHS * epoch_s / 60, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128, help="U-Net hidden size")
    parser.add_argument("--arch", default="assignment", choices=["assignment", "ddpm"])
    parser.add_argument("--steps", type=int, default=100, help="timed training steps")
    parser.add_argument("--workers", type=int, default=4, help="baseline DataLoader workers")
    parser.add_argument("--sample-num", type=int, default=64, help="images per sampling run")
    parser.add_argument("--profile", type=Path, help="write torch.profiler's table of training")
    args = parser.parse_args(argv)
    if args.quick:  # (the paper's network needs a multiple of 32)
        args.batch_size, args.steps, args.workers, args.sample_num = 16, 8, 0, 2
        args.hidden = 16 if args.arch == "assignment" else 32
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if not all(math.isfinite(v) for v in results.values() if isinstance(v, float)):
        raise SystemExit("non-finite measurement")
    return results


if __name__ == "__main__":
    main()
