"""Settings -> the core's Config: the one place where settings become core configuration.

Device-dependent choices are resolved here, once, for this machine: the device ('auto' ->
cuda when available), the precision ('auto' -> bf16 on CUDA), fused optimizer kernels and
torch.compile for training and sampling ('auto' -> on for CUDA; for sampling only with the
1000-step ancestral sampler, which repays compiling).
"""

from __future__ import annotations

from pathlib import Path

from ddpm.config import (
    Config,
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)
from settings.config import Settings


def core_config(settings: Settings) -> Config:
    """The core's Config for validated settings, resolved for this machine.

    Paths (data.root, data.folder) are made absolute, so the config does not depend on the
    working folder.

    Raises:
        ValueError: if train.device asks for CUDA and none is available.
    """
    from ddpm.training import resolve_device, resolve_precision  # imports torch

    device = resolve_device(settings.train.device)
    on_cuda = device.type == "cuda"
    data, sample, train, evaluation = settings.data, settings.sample, settings.train, settings.eval
    return Config(
        data=DataConfig(
            **data.model_dump(exclude={"root", "folder"}),
            root=data.root.resolve(),
            folder=data.folder.resolve() if isinstance(data.folder, Path) else data.folder,
        ),
        model=ModelConfig(
            **settings.model.model_dump(
                exclude={"channel_mult", "attention_resolutions", "init_from"}
            ),
            channel_mult=tuple(settings.model.channel_mult),
            attention_resolutions=tuple(settings.model.attention_resolutions),
            init_from=settings.model.init_from.resolve() if settings.model.init_from else None,
        ),
        diffusion=DiffusionConfig(**settings.diffusion.model_dump()),
        optim=OptimConfig(**settings.optim.model_dump()),
        train=TrainConfig(
            **train.model_dump(exclude={"device", "precision", "compile", "max_restarts"}),
            device=str(device),
            precision=resolve_precision(train.precision, device),
            compile=train.compile == "on" or (train.compile == "auto" and on_cuda),
            fused=on_cuda,
            checkpoint_every=settings.run.checkpoint_every,
            keep=settings.run.keep,
        ),
        sample=SampleConfig(
            **sample.model_dump(exclude={"compile"}),
            compile=sample.compile == "on"
            or (sample.compile == "auto" and on_cuda and sample.sampler == "ddpm"),
        ),
        eval=EvalConfig(
            **evaluation.model_dump(exclude={"metrics", "weights", "cache_dir"}),
            metrics=tuple(evaluation.metrics),
            weights=evaluation.weights.resolve() if evaluation.weights else None,
            cache_dir=(evaluation.cache_dir or settings.run.dir / "fid-stats").resolve(),
        ),
    )
