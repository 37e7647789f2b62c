"""The download task, shared by train_flow and sample_flow, and where a dataset's FID/KID
statistics are cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.tasks import exponential_backoff

from ddpm.config import Config, DataConfig
from ddpm.datasets import locate_dataset
from ddpm.evaluation import reference_key
from ddpm.prepared import is_url, read_manifest


def _download_may_recover(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a download only after a failure that may pass (a timeout, an HTTP 5xx); a name
    that does not resolve, a missing folder or a checksum failed twice fail every time."""
    return bool(getattr(state.data, "transient", False))


def data_reference_key(config: Config, data_path: str) -> str:
    """The cache key of the training images' FID/KID statistics: the dataset, where it is
    (and, for a prepared dataset, its shards' SHA-256: one prepared again in the same folder,
    as data.prepare=auto does when the images change, gets new statistics), its subset
    (chosen by the seed), the image size and channels, and the Inception weights."""
    data = config.data
    shards = ()
    if data.dataset == "prepared":
        shards = tuple(s["sha256"] for s in read_manifest(Path(data_path))["shards"])
    return reference_key(
        data.dataset,
        str(Path(data_path).resolve()),
        *shards,
        data.subset,
        config.train.seed if data.subset else None,
        data.image_size,
        config.model.channels,
        weights=config.eval.weights,
    )


@task(
    name="download",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),  # 1 s, 2 s, 4 s
    retry_condition_fn=_download_may_recover,
    cache_policy=INPUTS + TASK_SOURCE,
    persist_result=True,
)
def download_task(dataset: str, root: str, url: str, folder: str | None) -> str:
    """Fetch and verify the dataset (or find the image folder); returns its path.

    Cached on its inputs and this source: a second run, even a new flow run, is `Cached` and
    touches no network. Pass absolute paths, so the key does not depend on the working folder.
    """
    where = DataConfig(
        dataset=dataset,  # type: ignore[arg-type]
        root=Path(root),
        folder=Path(folder) if folder and not is_url(folder) else folder,
        url=url,
    )
    return str(locate_dataset(where))
