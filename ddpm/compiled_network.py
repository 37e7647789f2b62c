"""The network compiled for sampling: torch.compile once per model (an EMA copy compiles its
own), on CUDA as a CUDA graph (mode "reduce-overhead"): one replay per step instead of a
launch per kernel, which is what bounds a small network's sampling speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["CompiledFunctions", "compiled_network", "network_output"]


class CompiledFunctions(dict):
    """One model's compiled functions. A deep copy (the EMA is one) starts empty: a compiled
    function guards on the module it was compiled for, and a copy compiles its own."""

    def __deepcopy__(self, memo: dict) -> CompiledFunctions:
        return CompiledFunctions()


def network_output(model: nn.Module, x_in: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """The network at (x_in, its (B,) float time input): a plain function, so torch.compile can
    take it with the model as an argument (a bound method in the model's own cache would keep
    the model alive).

    Args:
        model: a DiffusionModel (its network is model.eps_model).
    """
    return model.eps_model(x_in, time)


def compiled_network(
    model: nn.Module, cache: CompiledFunctions, cuda: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model's network_output through torch.compile, compiled on the first call and kept in
    the model's cache (`cache["network"]`); a CUDA graph where `cuda`.

    Returns:
        (x_in (B, C, H, W), its time input (B,) float) -> the network's output, a copy.
    """
    if "network" not in cache:
        cache["network"] = torch.compile(
            network_output, mode="reduce-overhead" if cuda else None, dynamic=False
        )
    compiled = cache["network"]

    def run(x_in: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        # A CUDA graph's outputs are overwritten by its next replay: copy them out.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(model, x_in, time).clone()

    return run
