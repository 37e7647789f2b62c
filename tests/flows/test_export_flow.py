"""Export and start-from-pretrained through the flows: `ddpm-export` on a trained run, loaded by
diffusers' DDPMPipeline; `model.init_from` of a pipeline folder diffusers wrote itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from ddpm.diffusers_configs import unet2d_config
from ddpm.generate import load_trained_model
from flows.sample_flow import sample_flow
from flows.train_flow import train_flow
from settings import SettingsError, load_settings
from settings.sampling import GenerateOptions

# The paper's network, small: base 32, two levels, attention at 16 px, one block per level.
SMALL_PAPER = {
    "model.arch": "ddpm", "model.hidden_size": 32, "model.channel_mult": "1,2",
    "model.attention_resolutions": "16", "model.num_res_blocks": 1,
    "diffusion.num_timesteps": 1000, "train.epochs": 1,
}  # fmt: skip


def run_folder(runs: str) -> Path:
    (path,) = Path(runs).iterdir()
    return path


@pytest.mark.slow
def test_the_readme_export_command_writes_a_folder_ddpm_pipeline_samples_from(
    tiny: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """A tiny run of the paper's network, then `ddpm-export --run RUN --out DIR` (a flow run
    on the test's Prefect server): DDPMPipeline.from_pretrained(DIR) loads it and draws
    images; the folder holds safetensors and JSON (no pickles) and a model card; sample_flow
    draws from it as from a run."""
    state = train_flow(overrides={**tiny, **SMALL_PAPER}, return_state=True)
    assert state.is_completed(), state.message
    run, out = run_folder(tiny["run.dir"]), tmp_path / "export"
    command = Path(sys.executable).with_name("ddpm-export")  # the environment's console script
    assert command.is_file(), f"{command}: the console script is not installed"
    done = subprocess.run([str(command), "--run", str(run), "--out", str(out)], env=cli_env({}),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [".ddpm-export.json", "README.md", "model_index.json",
                     "scheduler/scheduler_config.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]  # fmt: skip
    pipeline = DDPMPipeline.from_pretrained(out)
    images = pipeline(batch_size=2, num_inference_steps=10, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and 0 <= images.min() <= images.max() <= 1
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "datasets:\n- cifar10" in card

    # The folder as sample_flow's run: drawn without training, as from google/ddpm-cifar10-32.
    images = tmp_path / "images"
    drawn = sample_flow(GenerateOptions(run=out, num=2, out=images, steps=3), return_state=True)
    assert drawn.is_completed(), drawn.message
    assert sorted(p.name for p in images.glob("*.png")) == ["000000.png", "000001.png"]


def diffusers_pipeline_folder(folder: Path, **changes: Any) -> Path:
    """A DDPMPipeline saved by diffusers itself: a UNet2DModel of SMALL_PAPER's layout with
    diffusers' random weights (changes: config fields) and the paper's DDPMScheduler."""
    from ddpm.config import ModelConfig

    model = ModelConfig(arch="ddpm", hidden_size=32, channel_mult=(1, 2),
                        attention_resolutions=(16,), num_res_blocks=1)  # fmt: skip
    config = {**unet2d_config(model, 32), **changes}
    torch.manual_seed(0)
    unet = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        folder
    )
    return folder


@pytest.mark.slow
def test_init_from_a_diffusers_pipeline_trains_an_epoch_and_samples(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    """model.init_from a pipeline folder diffusers saved (the paper's eps and linear schedule):
    the run's network starts with its weights (the same output as the folder's own network
    read back), trains one epoch, draws its grid, and its name says where it started."""
    folder = diffusers_pipeline_folder(tmp_path / "pretrained")
    paper = {"diffusion.prediction": "eps", "diffusion.schedule": "linear"}
    overrides = {**tiny, **SMALL_PAPER, **paper, "model.init_from": str(folder)}
    state = train_flow(overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    run = run_folder(tiny["run.dir"])
    assert run.name.endswith("-from-pretrained"), run.name
    assert (run / "samples" / "epoch_001.png").is_file()
    first = torch.load(run / "checkpoints" / "epoch_001.pt", weights_only=True)
    assert first["global_step"] == 2

    # What the run started from: the folder's weights, exactly (read as sample_flow reads it).
    start = load_trained_model(folder).diffusion.eps_model.state_dict()
    from ddpm.build import build_training
    from settings import core_config

    built = build_training(core_config(load_settings(overrides, env_file=None)), 2)
    for name, value in built.diffusion.eps_model.state_dict().items():
        assert torch.equal(value, start[name]), name


def test_init_from_another_layout_names_both_sides(tiny: dict[str, Any], tmp_path: Path) -> None:
    """A folder whose network is wider than the run's: one line naming the setting, both
    values and the folder; a folder that does not exist is a settings error."""
    folder = diffusers_pipeline_folder(tmp_path / "wide", block_out_channels=[64, 128])
    paper = {"diffusion.prediction": "eps", "diffusion.schedule": "linear"}
    state = train_flow(overrides={**tiny, **SMALL_PAPER, **paper, "model.init_from": str(folder)},
                       return_state=True)  # fmt: skip
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "model.hidden_size is 64, the run's is 32" in message, message
    assert str(folder) in message and "\n" not in message
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == [64, 128]
    with pytest.raises(SettingsError, match=r"model\.init_from"):
        load_settings({"model.init_from": str(tmp_path / "missing")}, env_file=None)
