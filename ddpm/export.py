"""Export a trained run to the diffusers format (ddpm.diffusers_format), with a model card.

    export(Path("runs/run-1a2b3c4d5e"), Path("export/my-ddpm"))  # EMA weights by default

writes a folder that `diffusers.DDPMPipeline.from_pretrained` loads: model_index.json,
unet/ (config and safetensors weights; the assignment network's module file too),
scheduler/scheduler_config.json and README.md, the model card with the Hub's metadata, and
MARKER, the list of the files it wrote with their SHA-256.

The folder is written beside `out` and moved into place. An existing `out` is replaced only
when it is empty or an earlier export left exactly as it was written (MARKER says so); anything
else, a user's files or an export changed since, is refused and left untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save

from ddpm.diffusers_configs import (
    DIFFUSERS_VERSION,
    FormatError,
    assignment_config,
    scheduler_config,
    unet2d_config,
)
from ddpm.diffusers_format import CUSTOM_MODULE, WEIGHTS_FILE, assignment_module, to_unet2d
from ddpm.files import FOLDER_MODE, atomic_write, write_json, write_text
from ddpm.generate import TrainedModel, load_trained_model
from ddpm.marked_folders import EXPORT_MARKER, check_export_target, remove_listed, write_marker
from ddpm.run_dir import RunDir

log = logging.getLogger(__name__)

MARKER = EXPORT_MARKER  # {"files": {relative path: sha256}}: what an export wrote


@dataclass(frozen=True)
class Exported:
    """What export wrote, and from what."""

    out: Path
    checkpoint: Path
    arch: str
    ema: bool
    global_step: int


def export(path: Path, out: Path, use_ema: bool = True) -> Exported:
    """Write the diffusers folder of a run folder's newest valid checkpoint, or of a checkpoint
    file (best.pt), to out: written beside it, then moved into place. An existing out is
    replaced only if it is empty or an earlier export as it was written
    (ddpm.marked_folders.check_export_target).

    Raises:
        NotOurs: naming out, before anything is read or written, if it holds anything else.
        CheckpointError: naming the file, if there is no checkpoint or no EMA when asked.
        FormatError: naming the setting, for a network diffusers cannot express.
    """
    out = Path(out)
    check_export_target(out)
    _remove_leftovers(out)
    trained = load_trained_model(Path(path), use_ema=use_ema)
    if trained.diffusion_config.formulation == "edm":
        raise FormatError(
            f"{trained.checkpoint} was trained with diffusion.formulation edm, which a "
            "diffusers folder cannot run: DDPMPipeline calls the UNet on the noisy image as it "
            "is, and only an EDM scheduler's scale_model_input applies EDM's input scaling "
            "c_in, so its images would be wrong; sample it with ddpm-sample (export takes runs "
            "of the discrete formulation)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(staging, FOLDER_MODE)  # mkdtemp's is 0700
        write_folder(trained, staging, card(trained, evaluation(Path(path), trained.checkpoint)))
        write_marker(staging, MARKER, "ddpm-export")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # made by mkdtemp above: ours alone
        raise
    return Exported(out, trained.checkpoint, trained.model.arch, use_ema, trained.global_step)


def _remove_leftovers(out: Path) -> None:
    """What an export of out killed midway left beside it: its staging folder, or the earlier
    export it had renamed aside (only the files that export listed)."""
    name = re.escape(out.name)
    for path in out.parent.glob(f".{out.name}.*"):
        if re.fullmatch(rf"\.{name}\.[A-Za-z0-9_]{{8}}\.partial", path.name):
            shutil.rmtree(path, ignore_errors=True)  # mkdtemp's name: made by an export
        elif re.fullmatch(rf"\.{name}\.replaced-[0-9a-f]{{8}}", path.name):
            remove_listed(path, MARKER)


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename staging to out; an existing out (checked by check_export_target) is first
    renamed aside and then only the files its marker lists are removed, so a file a user
    dropped into it meanwhile survives (in the renamed folder, with a warning)."""
    if not out.exists():
        os.rename(staging, out)
        return
    check_export_target(out)  # again: the user may have written into it while the export ran
    aside = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)  # put it back
        raise
    if not remove_listed(aside, MARKER):
        log.warning("%s held files the earlier export did not write; they were kept in %s",
                    out, aside)  # fmt: skip


def write_folder(trained: TrainedModel, folder: Path, readme: str) -> None:
    """model_index.json, unet/, scheduler/ and README.md of trained, in folder."""
    model, diffusion, size = trained.model, trained.diffusion_config, trained.image_shape[-1]
    # The augmentation labels are all zero when sampling, so their layer adds nothing: the
    # exported network is the sampled one without it (diffusers' UNet2DModel has no such input).
    weights = {k: v for k, v in trained.diffusion.eps_model.state_dict().items()
               if not k.startswith("augment.")}  # fmt: skip
    clip = _clip(trained)
    unet = folder / "unet"
    if model.arch == "ddpm":
        config = unet2d_config(model, size)
        weights = to_unet2d(weights, model, size, diffusion.num_timesteps)
        library = "diffusers"
    else:
        config = assignment_config(model, size, diffusion.num_timesteps)
        weights = {f"net.{k}": v.detach().float().contiguous() for k, v in weights.items()}
        write_text(unet / f"{CUSTOM_MODULE}.py", assignment_module())
        library = CUSTOM_MODULE
    write_json(unet / "config.json", config)
    data = save(weights, metadata={"format": "pt"})
    atomic_write(unet / WEIGHTS_FILE, lambda f: f.write(data))
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(diffusion, clip))
    write_json(folder / "model_index.json", {
        "_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": [library, config["_class_name"]],
    })  # fmt: skip
    write_text(folder / "README.md", readme)


def evaluation(path: Path, checkpoint: Path) -> dict[str, Any] | None:
    """The run's best.json (FID, KID and epoch) when checkpoint is that run's best.pt or its
    epoch checkpoint; None where the run did not evaluate it."""
    folder = path if path.is_dir() else checkpoint.parent.parent
    best = RunDir(folder).best()
    if best is None:
        return None
    return best if checkpoint.name in ("best.pt", best.get("checkpoint")) else None


CARD = """---
license: mit
library_name: diffusers
pipeline_tag: unconditional-image-generation
tags:
- pytorch
- diffusers
- unconditional-image-generation
- ddpm
{datasets}---

# {name}: an unconditional DDPM

A denoising diffusion probabilistic model (Ho et al. 2020,
[arXiv:2006.11239](https://arxiv.org/abs/2006.11239)) trained with ddpm-pipeline on {data}.

- Network: {network}, {params:,} parameters, images of {shape} (C x H x W).
- Diffusion: T = {T}, {schedule} schedule; the network predicts {prediction}.
- Weights: the {weights} weights of `{checkpoint}`, epoch {epoch}, step {step}.
- Scheduler: `DDPMScheduler` set as the project's ancestral sampler (sigma_t^2 = beta_t,
  x0 {clip}).

## Evaluation

{score}

## Usage

```python
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("<this folder or Hub repo>"{remote})
images = pipeline(batch_size=16, num_inference_steps={T}).images
```
{remote_note}
## Training settings

| setting | value |
|---|---|
{settings}
"""


def card(trained: TrainedModel, evaluated: dict[str, Any] | None) -> str:
    """README.md: the Hub's YAML metadata, what the model is, how it was trained, its FID
    where the run evaluated this checkpoint, and how to sample from it."""
    model, diffusion, settings = trained.model, trained.diffusion_config, trained.settings
    data = settings.get("data") or {}
    cifar = data.get("dataset", "cifar10") == "cifar10"
    custom = model.arch != "ddpm"
    kid = f", KID {evaluated['kid']:.4g}" if evaluated and "kid" in evaluated else ""
    score = (
        f"FID {evaluated['fid']:.4g}{kid} (this checkpoint, epoch {evaluated['epoch']}: "
        f"{(settings.get('eval') or {}).get('num_samples', '?')} samples against the training "
        "images, torch-fidelity's Inception)"
        if evaluated else "Not evaluated: the run computed no FID for this checkpoint."
    )  # fmt: skip
    return CARD.format(
        datasets="datasets:\n- cifar10\n" if cifar else "",
        name=trained.checkpoint.parent.parent.name,
        data="CIFAR-10" if cifar else f"an image folder ({data.get('image_size', 32)} px)",
        network="the course assignment's small U-Net (a custom component: "
        "`unet/assignment_unet.py`)" if custom else "the DDPM paper's U-Net (`UNet2DModel`)",
        params=sum(p.numel() for p in trained.diffusion.eps_model.parameters()),
        shape="x".join(map(str, trained.image_shape)), T=diffusion.num_timesteps,
        schedule=diffusion.schedule, prediction=diffusion.prediction,
        weights="EMA of the" if trained.ema else "trained (not averaged)",
        checkpoint=trained.checkpoint.name, epoch=trained.epoch, step=trained.global_step,
        clip="clipped to [-1, 1]" if _clip(trained) else "not clipped", score=score,
        remote=", trust_remote_code=True" if custom else "",
        remote_note="\n`trust_remote_code=True` runs `unet/assignment_unet.py` from this "
        "folder: read it first.\n" if custom else "",
        settings="\n".join(
            f"| `{group}.{key}` | `{json.dumps(value)}` |"
            for group in ("data", "model", "diffusion", "optim", "train")
            for key, value in sorted((settings.get(group) or {}).items())
        ),
    )  # fmt: skip


def _clip(trained: TrainedModel) -> bool:
    """Whether the run's samples clip x0 (sample.clip_denoised; on by default)."""
    return bool((trained.settings.get("sample") or {}).get("clip_denoised", True))
