"""A stand-in for torch-fidelity's Inception weights file, for tests on machines without internet.

The official file (ddpm.evaluation.INCEPTION_FILE) is a plain dict saved with torch.save: for each
of the 94 conv + BatchNorm blocks `<block>.conv.weight` and `<block>.bn.{weight,bias,running_mean,
running_var}`, plus `fc.weight` (1008, 2048) and `fc.bias` (1008,): 472 float32 tensors, 23.9M
values, no `num_batches_tracked` (torch-fidelity's utils/util_convert_inception_weights.py). The
keys and shapes here come from torch-fidelity's own module, built on the meta device.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch


def inception_shapes() -> dict[str, torch.Size]:
    """The state-dict keys and shapes torch-fidelity's FeatureExtractorInceptionV3 loads."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the skeleton only: nothing to load
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):  # shapes without allocating 96 MB
        skeleton = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    return {
        name: tensor.shape
        for name, tensor in skeleton.state_dict().items()
        if not name.endswith("num_batches_tracked")  # absent from the official file
    }


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """Write random Inception weights with exactly the official file's keys and shapes.

    Conv and fc weights are He-normal (std sqrt(2 / fan_in), the ReLU-preserving scale), BatchNorm
    is the identity (weight 1, bias 0, running_mean 0, running_var 1) and fc.bias 0, so the
    2048-d features are finite, non-negative and differ between images. Returns path.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in inception_shapes().items():
        if len(shape) >= 2:  # conv (out, in, kh, kw) or fc (out, in)
            fan_in = math.prod(shape[1:])
            state[name] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        elif name.endswith(("bn.weight", "running_var")):
            state[name] = torch.ones(shape)
        else:  # bn.bias, running_mean, fc.bias
            state[name] = torch.zeros(shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
