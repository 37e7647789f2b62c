"""Parameters, forward FLOPs and CPU training img/s of both networks at batch 16, base 128.

    PYTHONPATH=. python benchmarks/results/gpu/arch_cpu_speed.py

The project's training path (benchmarks.speed.project_img_per_s: fp32 on a CPU), one intra-op
thread, 8 timed steps after 2 warm-up steps, on random uint8 images.
"""

import torch

from benchmarks.speed import forward_gflops_per_image, network, project_img_per_s

torch.set_num_threads(1)
images = torch.randint(0, 256, (10 * 16, 3, 32, 32), dtype=torch.uint8)
for arch in ("assignment", "ddpm"):
    params = sum(p.numel() for p in network(128, arch).parameters())
    gflops = forward_gflops_per_image(128, 32, arch)
    speed = project_img_per_s(images, 128, 16, torch.device("cpu"), 8, arch=arch)
    print(f"{arch}: {params / 1e6:.3f} M parameters, {gflops:.3f} GFLOP/img forward, "
          f"training {speed:.2f} img/s at batch 16")  # fmt: skip
