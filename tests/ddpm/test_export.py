"""The diffusers format: our DDPMUNet against diffusers' own UNet2DModel in both directions,
exported runs loaded by DDPMPipeline (both networks), and its scheduler against our sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from safetensors.torch import load_file
from tiny_run import make_config

from ddpm.build import build_training
from ddpm.config import ModelConfig
from ddpm.ddpm_unet import DDPMUNet
from ddpm.diffusers_configs import FormatError, model_from_unet2d, unet2d_config
from ddpm.diffusers_format import from_unet2d, to_unet2d
from ddpm.export import export
from ddpm.files import FILE_MODE, FOLDER_MODE, NotOurs
from ddpm.generate import load_trained_model
from ddpm.run_dir import RunDir, save_epoch_checkpoint

PAPER = ModelConfig(arch="ddpm")  # the CIFAR-10 network: base 128, (1, 2, 2, 2), attention at 16
TIMESTEPS = torch.tensor([0, 1, 17, 250, 998, 999])


def randomized(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """net in eval mode, its zero-initialised layers (each block's last conv, the output
    conv) given random weights of a trained network's scale, and every norm's affine
    parameters moved off 1 and 0, so that no path is the identity or zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not p.any() or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return net.eval()


def ours_at(net: DDPMUNet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Our network at timestep indices t, as DiffusionModel feeds it: (t + 1) / T."""
    return net(x, (t + 1).float() / 1000)


def diffusers_unet(config: dict) -> UNet2DModel:
    return UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})


def test_paper_network_and_unet2dmodel_give_the_same_output_both_ways(tmp_path: Path) -> None:
    """The paper's CIFAR-10 network (35.7 M parameters): our DDPMUNet with random weights,
    converted, and diffusers' UNet2DModel give the same output for the same (x_t, t) within
    1e-5 in fp32; and a UNet2DModel with random weights, saved by diffusers itself and read
    back as a DDPMUNet, too. This checks our network against an independent implementation."""
    torch.manual_seed(0)
    ours = randomized(DDPMUNet(3, 3, dropout=0.0), seed=1)
    theirs = diffusers_unet(unet2d_config(PAPER, 32)).eval()
    theirs.load_state_dict(to_unet2d(ours.state_dict(), PAPER, 32, 1000), strict=True)
    x = torch.randn(len(TIMESTEPS), 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gap = (ours_at(ours, x, TIMESTEPS) - theirs(x, TIMESTEPS).sample).abs().max().item()
    print(f"ours -> diffusers: max |difference| {gap:.2e}")
    assert gap < 1e-5

    randomized(theirs, seed=3).save_pretrained(tmp_path / "unet")  # safetensors, config.json
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    model, size = model_from_unet2d(config, "unet/config.json")
    assert (model, size) == (ModelConfig(arch="ddpm", dropout=0.1), 32)
    back = DDPMUNet(3, 3, dropout=0.0).eval()
    weights = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    back.load_state_dict(from_unet2d(weights, model, size, 1000), strict=True)
    with torch.no_grad():
        gap = (ours_at(back, x, TIMESTEPS) - theirs(x, TIMESTEPS).sample).abs().max().item()
    print(f"diffusers -> ours: max |difference| {gap:.2e}")
    assert gap < 1e-5


def test_a_timestep_count_unet2dmodel_cannot_embed_is_named() -> None:
    """diffusers embeds the timestep index itself: T other than 1000 is refused by name."""
    with pytest.raises(FormatError, match=r"diffusion\.num_timesteps is 20"):
        to_unet2d(DDPMUNet(3, 3, 32, (1, 2)).state_dict(), ModelConfig(arch="ddpm",
                  hidden_size=32, channel_mult=(1, 2)), 32, 20)  # fmt: skip


def tiny_checkpoint(folder: Path, **changes) -> Path:
    """A run folder holding one epoch checkpoint of a tiny network (changes: dotted settings
    with __ for the dot), its EMA one update away from its weights."""
    config = make_config({k.replace("__", "."): v for k, v in changes.items()})
    state = build_training(config, total_steps=4, settings={"model": {"arch": config.model.arch}})
    randomized(state.diffusion, seed=5).train()
    state.ema.update_parameters(state.diffusion)
    state.epoch, state.global_step = 1, 4
    run = RunDir(folder)
    save_epoch_checkpoint(state.snapshot(), run, keep=1)
    return folder


@pytest.mark.parametrize("arch", ["ddpm", "assignment"])
def test_exported_run_loads_in_ddpm_pipeline_and_draws_our_images(
    arch: str, tmp_path: Path
) -> None:
    """A tiny run exported (EMA weights) loads with DDPMPipeline.from_pretrained (the
    assignment network as a custom component, trust_remote_code=True) and, from the same
    noise, its 1000 ancestral steps draw our sampler's images: within half an 8-bit level as
    exported (diffusers computes the step's coefficients in float32, we in float64: measured
    1.5e-4 for the ddpm network), within 1e-5 on our float64 coefficients."""
    changes = {"diffusion__num_timesteps": 1000, "model__arch": arch}
    if arch == "ddpm":
        changes |= {"model__hidden_size": 32, "model__channel_mult": (1,),
                    "model__attention_resolutions": (), "model__num_res_blocks": 1}  # fmt: skip
    run = tiny_checkpoint(tmp_path / "run", **changes)
    done = export(run, tmp_path / "export")
    assert done.ema and done.arch == arch and done.global_step == 4
    assert not list((tmp_path / "export").rglob("*.bin")) and not list(
        (tmp_path / "export").rglob("*.pt")
    )  # nothing pickled
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "export", trust_remote_code=True)
    model = load_trained_model(run).diffusion
    with torch.no_grad():
        ours = model.sample(1, (3, 32, 32), "ddpm", generator=torch.Generator().manual_seed(0))
    ours = ours / 2 + 0.5  # the pipeline's [0, 1]

    def theirs() -> torch.Tensor:
        return torch.as_tensor(pipeline(batch_size=1, generator=torch.Generator().manual_seed(0),
                               num_inference_steps=1000, output_type="pt").images)  # fmt: skip

    as_exported = (ours - theirs()).abs().max().item()
    # The same arithmetic: diffusers' scheduler on our float64 abar_t instead of its float32.
    scheduler = pipeline.scheduler
    scheduler.alphas_cumprod = model.alphas_cumprod_f64
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    same_coefficients = (ours - theirs()).abs().max().item()
    print(f"{arch}: max |difference| of the images {as_exported:.2e} as exported, "
          f"{same_coefficients:.2e} on float64 coefficients")  # fmt: skip
    assert as_exported < 0.5 / 255  # the same 8-bit images, up to rounding at a level's edge
    assert same_coefficients < 1e-5
    card = (tmp_path / "export" / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\nlibrary_name: diffusers\n")
    assert "Not evaluated" in card and "step 4" in card


def test_an_edm_run_is_refused_naming_what_diffusers_cannot_run(tmp_path: Path) -> None:
    """diffusers' DDPMPipeline never applies EDM's input scaling (only an EDM scheduler's
    scale_model_input does), so an edm run is refused naming the setting and the reason, and
    no folder is written."""
    run = tiny_checkpoint(tmp_path / "run", diffusion__formulation="edm",
                          diffusion__sigma_data=0.5)  # fmt: skip
    with pytest.raises(FormatError, match=r"diffusion\.formulation edm.*scale_model_input"):
        export(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder (relative) with its bytes (None for a folder)."""
    return {
        p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


def test_export_refuses_a_folder_it_did_not_write_and_leaves_it_untouched(
    tmp_path: Path,
) -> None:
    """--out naming a folder of the user's (a thesis, a subfolder) is refused before anything
    is read or written, in one line naming the folder and a file; the folder is as it was,
    and nothing is left beside it. An empty folder, or a file, is named too."""
    run = tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "mine"
    (out / "chapters").mkdir(parents=True)
    (out / "thesis.txt").write_text("three years of work")
    (out / "chapters" / "one.tex").write_text("\\chapter{One}")
    before = tree(out)
    with pytest.raises(NotOurs, match=rf"^{out} \(--out\) holds files that ddpm-export did not "
                       r"write \(chapters, thesis.txt\)") as err:  # fmt: skip
        export(run, out)
    assert "\n" not in str(err.value)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(NotOurs, match="is a file, not a folder"):
        export(run, tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_export_replaces_only_an_earlier_export_as_it_wrote_it(tmp_path: Path) -> None:
    """An empty folder is exported into; an earlier export is replaced by the next; but an
    export holding a file the user added, or a file changed since it was written, is
    refused, naming that file, and left as it was. Exported files and folders have the
    modes the umask gives (0644 and 0755 under 022), not mkstemp's 0600."""
    run, out = tiny_checkpoint(tmp_path / "run"), tmp_path / "export"
    out.mkdir()
    export(run, out)
    first = tree(out)
    export(run, out)  # its own earlier export: replaced
    assert tree(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]  # nothing beside it
    for path in [out, *out.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (FOLDER_MODE if path.is_dir() else FILE_MODE), (path, oct(mode))
    (out / "unet" / "notes.txt").write_text("my notes")
    with pytest.raises(NotOurs, match=r"holds unet/notes.txt, that ddpm-export did not write"):
        export(run, out)
    (out / "unet" / "notes.txt").unlink()
    (out / "README.md").write_text("my own model card")
    with pytest.raises(NotOurs, match=r"holds README.md, changed since ddpm-export wrote it"):
        export(run, out)
    assert (out / "README.md").read_text() == "my own model card"
    (out / ".ddpm-export.json").write_text("{")  # a damaged marker proves nothing
    with pytest.raises(NotOurs, match=r"is not a verifiable ddpm-export folder: "
                       r".*\.ddpm-export\.json is damaged \(not JSON"):  # fmt: skip
        export(run, out)


def test_what_a_killed_export_left_beside_its_folder_is_removed(tmp_path: Path) -> None:
    """An export killed midway leaves its staging folder, or the earlier export it had moved
    aside, beside --out; the next export removes them, all but a file the user had put in the
    earlier export (which stays, in the folder moved aside)."""
    run, out = tiny_checkpoint(tmp_path / "run"), tmp_path / "export"
    staging = tmp_path / ".export.ab12cd34.partial"
    (staging / "unet").mkdir(parents=True)
    (staging / "unet" / "config.json").write_text("{}")
    aside = tmp_path / ".export.replaced-0123abcd"
    export(run, aside)  # an earlier export, as the killed one had moved it
    (aside / "mine.txt").write_text("keep me")
    export(run, out)
    assert not staging.exists()
    assert [p.name for p in aside.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.replaced-0123abcd", "export",
                                                          "run"]  # fmt: skip
