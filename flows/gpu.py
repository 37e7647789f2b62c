"""Turns on a shared GPU: the global concurrency limit `gpu` that CUDA runs take a slot of."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from prefect import get_client, get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

GPU_SLOT = "gpu"  # the global concurrency limit CUDA runs take a slot of


def _limit_exists(name: str) -> bool:
    """Whether the server has a global concurrency limit of this name."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


@contextlib.contextmanager
def gpu_slot(device: str, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold a slot of the global concurrency limit `gpu` while a CUDA run trains.

    With `prefect gcl create gpu --limit 1`, runs on one machine take turns on its GPU, a
    whole run at a time: a run keeps its model and optimizer state on the GPU between tasks,
    so turns per task would not free its memory (and would cost a server round trip per
    task). CPU runs take no slot; without the limit nothing waits.

    Raises:
        TimeoutError: if timeout_seconds pass without a free slot.
    """
    if torch.device(device).type != "cuda" or not _limit_exists(GPU_SLOT):
        yield
        return
    get_run_logger().info("waiting for a slot of the %r concurrency limit", GPU_SLOT)
    with concurrency(GPU_SLOT, occupy=1, timeout_seconds=timeout_seconds):
        yield
