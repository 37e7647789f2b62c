"""Training img/s of the project's path on CUDA under layout variants, each in its own process.

    python benchmarks/results/gpu/layout_variants.py compiled|forced|eager

compiled: torch.compile, contiguous (inductor skips its channels-last layout optimisation when
the graph has a transposed convolution); forced: the same with TORCHINDUCTOR_FORCE_LAYOUT_OPT=1
set by the caller; eager: no compile, model and batches channels-last.
"""

import sys

import torch

from benchmarks.speed import project_img_per_s

variant = sys.argv[1]
images = torch.randint(0, 256, (100 * 128, 3, 32, 32), dtype=torch.uint8)
try:
    speed = project_img_per_s(
        images, 128, 128, torch.device("cuda"), 100, compile=variant != "eager"
    )
    print(f"{variant}: {speed:.1f} img/s")
except Exception as error:
    print(f"{variant}: failed: {str(error).splitlines()[0]}")
