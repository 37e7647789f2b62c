"""The Hugging Face diffusers format: a trained network written as a folder that
`diffusers.DDPMPipeline.from_pretrained` loads, and a diffusers UNet2DModel read back as the
DDPM paper's network. Safetensors and JSON only; diffusers itself is not imported here.

A folder holds `model_index.json`, `unet/` (config.json and diffusion_pytorch_model.safetensors)
and `scheduler/scheduler_config.json`:
- `model.arch=ddpm` is a `UNet2DModel` in the layout of the paper's CIFAR-10 model
  (google/ddpm-cifar10-32), every field written (its config: ddpm.diffusers_configs); the
  weights map one to one, except the first layer of the timestep MLP (see `_time_rotation`).
- the assignment's network is a custom component: its module file (`unet/assignment_unet.py`,
  this project's ddpm/unet.py with a diffusers wrapper) is in the folder, and diffusers loads
  it with `trust_remote_code=True`.
- the scheduler is `DDPMScheduler` with the run's betas, prediction and clipping and the
  ancestral step's variance (sigma_t^2 = beta_t: "fixed_large"; ddpm.diffusers_configs).

Shapes: C = base width, L = levels (len(channel_mult)).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ddpm.config import DiffusionConfig, ModelConfig
from ddpm.diffusers_configs import FormatError, diffusion_from_scheduler, model_from_unet2d
from ddpm.errors import UserError, first_line
from ddpm.files import damaged, read_json
from ddpm.marked_folders import EXPORT_MARKER, sha256_of
from ddpm.unet import SCALE, timestep_frequencies

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CUSTOM_MODULE = "assignment_unet"  # unet/assignment_unet.py, class AssignmentUNet


def _pairs(model: ModelConfig, image_size: int) -> Iterator[tuple[str, str, str]]:
    """(our module, diffusers' module, kind) for every module of DDPMUNet with weights."""
    yield from [("conv_in", "conv_in", ""), ("temb.0", "time_embedding.linear_1", ""),
                ("temb.2", "time_embedding.linear_2", ""), ("norm_out", "conv_norm_out", ""),
                ("conv_out", "conv_out", ""), ("mid.0", "mid_block.resnets.0", "resnet"),
                ("mid.1", "mid_block.attentions.0", "attn"),
                ("mid.2", "mid_block.resnets.1", "resnet")]  # fmt: skip
    levels = len(model.channel_mult)
    attends = [image_size >> i in model.attention_resolutions for i in range(levels)]
    k = 0
    for i in range(levels):
        for j in range(model.num_res_blocks):
            yield f"down.{k}.0", f"down_blocks.{i}.resnets.{j}", "resnet"
            if attends[i]:
                yield f"down.{k}.1", f"down_blocks.{i}.attentions.{j}", "attn"
            k += 1
        if i != levels - 1:
            yield f"down.{k}.0.conv", f"down_blocks.{i}.downsamplers.0.conv", ""
            k += 1
    k = 0
    for n, i in enumerate(reversed(range(levels))):
        for j in range(model.num_res_blocks + 1):
            yield f"up.{k}.0", f"up_blocks.{n}.resnets.{j}", "resnet"
            if attends[i]:
                yield f"up.{k}.1", f"up_blocks.{n}.attentions.{j}", "attn"
            k += 1
        if i != 0:
            yield f"up.{k}.0.conv", f"up_blocks.{n}.upsamplers.0.conv", ""
            k += 1


_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
           "conv2": "conv2", "shortcut": "conv_shortcut"}  # fmt: skip


def _names(ours: str, theirs: str, kind: str) -> Iterator[tuple[str, str]]:
    """(our parameter, diffusers' parameter) of one module, attention's qkv aside."""
    parts = {"resnet": _RESNET.items(), "attn": [("norm", "group_norm")]}.get(kind, [("", "")])
    for a, b in parts:
        for p in ("weight", "bias"):
            yield ".".join(filter(None, (ours, a, p))), ".".join(filter(None, (theirs, b, p)))


def _time_rotation(width: int, num_timesteps: int) -> torch.Tensor:
    """(C, C) float64 R with our embedding = R @ diffusers' embedding.

    Our network embeds timestep index t as the angles (t + 1) * SCALE / T * f (DiffusionModel
    feeds (t + 1) / T); diffusers' as t * f. For T = SCALE the angles differ by f, a rotation of
    each (sin, cos) pair, which the first linear layer of the timestep MLP absorbs exactly.
    """
    if num_timesteps != SCALE:
        raise FormatError(
            f"diffusion.num_timesteps is {num_timesteps}: diffusers' UNet2DModel embeds the "
            f"timestep index itself, which matches this network's embedding only for "
            f"T = {SCALE:.0f}"
        )
    f = timestep_frequencies(width).double()
    c, s = torch.diag(f.cos()), torch.diag(f.sin())
    return torch.cat((torch.cat((c, s), 1), torch.cat((-s, c), 1)), 0)


def to_unet2d(
    state: Mapping[str, torch.Tensor], model: ModelConfig, image_size: int, num_timesteps: int
) -> dict[str, torch.Tensor]:
    """DDPMUNet's state dict -> UNet2DModel's (float32, contiguous)."""
    rotation = _time_rotation(model.hidden_size, num_timesteps)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, kind in _pairs(model, image_size):
        out.update({b: state[a] for a, b in _names(ours, theirs, kind) if a in state})
        if kind == "attn":  # 1x1 convolutions (C', C, 1, 1) -> linear layers (C', C)
            for p in ("weight", "bias"):
                qkv, proj = (state[f"{ours}.{m}.{p}"] for m in ("qkv", "proj_out"))
                qkv, proj = (qkv.flatten(1), proj.flatten(1)) if p == "weight" else (qkv, proj)
                out.update(zip([f"{theirs}.to_{x}.{p}" for x in "qkv"], qkv.chunk(3), strict=True))
                out[f"{theirs}.to_out.0.{p}"] = proj
    w = out["time_embedding.linear_1.weight"]
    out["time_embedding.linear_1.weight"] = (w.double() @ rotation).to(w.dtype)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def from_unet2d(
    state: Mapping[str, torch.Tensor], model: ModelConfig, image_size: int, num_timesteps: int
) -> dict[str, torch.Tensor]:
    """UNet2DModel's state dict -> DDPMUNet's (the inverse of to_unet2d).

    Raises:
        FormatError: if a weight the layout needs is missing or one is left over.
    """
    rotation = _time_rotation(model.hidden_size, num_timesteps)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, theirs, kind in _pairs(model, image_size):
        for a, b in _names(ours, theirs, kind):
            if b in state:
                out[a] = state[b]
                used.add(b)
        if kind == "attn":
            for p in ("weight", "bias"):
                names = [f"{theirs}.to_{x}.{p}" for x in ("q", "k", "v", "out.0")]
                missing = [n for n in names if n not in state]
                if missing:
                    raise FormatError(f"the UNet2DModel weights lack {missing[0]}")
                used.update(names)
                qkv = torch.cat([state[n] for n in names[:3]])
                out[f"{ours}.qkv.{p}"] = qkv[..., None, None] if p == "weight" else qkv
                proj = state[names[3]]
                out[f"{ours}.proj_out.{p}"] = proj[..., None, None] if p == "weight" else proj
    left = sorted(set(state) - used)
    if left:
        raise FormatError(f"the UNet2DModel weights hold {left[0]}, which the layout lacks")
    w = out["temb.0.weight"]
    out["temb.0.weight"] = (w.double() @ rotation.T).to(w.dtype)
    return {k: v.contiguous() for k, v in out.items()}


_WRAPPER = '''

# --- The diffusers component around the network above (written by ddpm.diffusers_format). ---

from diffusers import ConfigMixin, ModelMixin  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402


class AssignmentUNet(ModelMixin, ConfigMixin):
    """The assignment's U-Net as a diffusers model: (sample, timestep index) -> the network's
    prediction, the index fed as (t + 1) / num_train_timesteps as the project trained it."""

    @register_to_config
    def __init__(self, in_channels=3, out_channels=3, hidden_size=128, sample_size=32,
                 num_train_timesteps=1000):
        super().__init__()
        self.net = UNet(in_channels, out_channels, hidden_size)

    def forward(self, sample, timestep, return_dict=True):
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1)
        t = (t.expand(sample.shape[0]) + 1) / self.config.num_train_timesteps
        out = self.net(sample, t)
        return UNet2DOutput(sample=out) if return_dict else (out,)
'''


def assignment_module() -> str:
    """unet/assignment_unet.py: ddpm/unet.py (which imports only torch) and the wrapper."""
    from ddpm import unet

    return inspect.getsource(unet) + _WRAPPER


def read_folder(path: Path) -> tuple[ModelConfig, DiffusionConfig, int, dict[str, torch.Tensor]]:
    """A diffusers folder's network as this project builds it: (model, diffusion, image side,
    the network's state dict). path is a pipeline folder (model_index.json, unet/, scheduler/,
    as google/ddpm-cifar10-32 or an export) or a UNet2DModel folder (config.json and weights);
    without a scheduler the diffusion is the paper's (linear, eps, T = 1000).

    Raises:
        FormatError: naming the file, for a missing or pickled weights file or a network that
            is neither the paper's layout nor this project's assignment network.
    """
    path = Path(path)
    unet = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (unet / "config.json").is_file():
        raise FormatError(f"{path}: no unet/config.json or config.json: not a diffusers folder")
    weights = unet / WEIGHTS_FILE
    if not weights.is_file():
        raise FormatError(f"{weights}: missing (only safetensors weights are read, no pickles)")
    verify_export(path)
    fix = "export the run again, or fetch the folder again"
    config = read_json(unet / "config.json", fix)
    scheduler = path / "scheduler" / "scheduler_config.json"
    scheduler_json = read_json(scheduler, fix) if scheduler.is_file() else None
    state = _load_weights(weights, fix)
    read = scheduler  # the file being interpreted, for the message
    try:
        diffusion = (
            diffusion_from_scheduler(scheduler_json, str(scheduler))
            if scheduler_json is not None else DiffusionConfig(schedule="linear", prediction="eps")
        )  # fmt: skip
        read = unet / "config.json"
        if config.get("_class_name") == "AssignmentUNet":
            model = ModelConfig(hidden_size=config["hidden_size"], channels=config["in_channels"])
            size = config["sample_size"]
            return model, diffusion, size, {k.removeprefix("net."): v for k, v in state.items()}
        if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
            raise FormatError(f"{read}: a {config['_class_name']}, not a UNet2DModel")
        model, size = model_from_unet2d(config, str(unet / "config.json"))
        return model, diffusion, size, from_unet2d(state, model, size, diffusion.num_timesteps)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise FormatError(
            f"{read}: not a diffusers config this project reads ({type(err).__name__}: "
            f"{first_line(err)}); {fix}"
        ) from None


def verify_export(folder: Path) -> None:
    """Check a folder ddpm-export wrote (it holds EXPORT_MARKER) against the SHA-256 of each
    file the marker lists; a folder without the marker (diffusers' own) is not checked.

    Raises:
        DamagedFile: naming the first file that differs from what the export wrote, or a
            damaged marker.
    """
    fix = "export the run again (ddpm-export), or fetch the folder again"
    try:
        listed = read_json(Path(folder) / EXPORT_MARKER, fix).get("files")
    except FileNotFoundError:
        return
    if not isinstance(listed, dict):
        raise damaged(Path(folder) / EXPORT_MARKER, "no list of files in it", fix)
    for name, digest in sorted(listed.items()):
        file = Path(folder) / name
        if not file.is_file() or sha256_of(file) != digest:
            what = "missing" if not file.is_file() else "it is not what ddpm-export wrote"
            raise damaged(file, f"{what}, by {EXPORT_MARKER}", fix)


def _load_weights(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a file safetensors cannot read is named (DamagedFile)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise damaged(path, f"not a safetensors file: {first_line(err)}", fix) from None


def check_start(folder: Path, found: tuple[ModelConfig, DiffusionConfig, int], wanted:
                tuple[ModelConfig, DiffusionConfig, int]) -> None:  # fmt: skip
    """Raise FormatError naming the first setting where a run (wanted) and the folder it starts
    from (found) differ: the network's layout, the image size, T, schedule or prediction."""
    names = {"model": ("arch", "hidden_size", "channels", "channel_mult", "num_res_blocks",
                       "attention_resolutions"),
             "diffusion": ("num_timesteps", "schedule", "prediction")}  # fmt: skip
    pairs = [(f"model.{n}", getattr(found[0], n), getattr(wanted[0], n)) for n in names["model"]]
    pairs += [(f"diffusion.{n}", getattr(found[1], n), getattr(wanted[1], n))
              for n in names["diffusion"]]  # fmt: skip
    pairs.append(("data.image_size", found[2], wanted[2]))
    paper_only = ("model.channel_mult", "model.num_res_blocks", "model.attention_resolutions")
    for name, theirs, ours in pairs:
        if wanted[0].arch == "assignment" and name in paper_only:
            continue  # the paper network's options do not apply to the assignment's
        if theirs != ours:
            raise FormatError(
                f"model.init_from {folder}: its {name} is {_plain(theirs)}, the run's is "
                f"{_plain(ours)}; set {name} to match or start from another folder"
            )


def _plain(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
