"""The DDPM paper's U-Net (model.arch=ddpm): its size, shapes, training, dropout, and its
checkpoints kept apart from the assignment network's."""

from __future__ import annotations

import statistics

import pytest
import torch
from tiny_run import make_config, smooth_batch

from ddpm.batches import TrainingData
from ddpm.build import build_training
from ddpm.checkpoint import CheckpointError
from ddpm.datasets import load_dataset, locate_dataset
from ddpm.ddpm_unet import DDPMUNet
from ddpm.diffusion import DiffusionModel
from ddpm.generate import draw_samples, generate, load_trained_model
from ddpm.run_dir import RunDir, save_epoch_checkpoint
from ddpm.trainer import Trainer, train_step
from ddpm.training import TrainingState


def test_cifar10_network_has_the_papers_35_7_million_parameters() -> None:
    """Base 128, multipliers (1, 2, 2, 2), 2 residual blocks, attention at 16x16: 35.7 M
    parameters (Ho et al. 2020, Appendix B), within 0.1 M."""
    count = sum(p.numel() for p in DDPMUNet(3, 3).parameters())
    assert abs(count - 35.7e6) < 0.1e6, count


@pytest.mark.parametrize("side", [32, 64, 128])
def test_output_has_the_input_shape(side: int) -> None:
    """At 32, 64 and 128 px (attention at 16x16 is reached at each) the noise estimate has
    the shape of the image."""
    net = DDPMUNet(3, 3, hidden_size=32, image_size=side)
    x = torch.randn(2, 3, side, side)
    assert net(x, torch.rand(2)).shape == x.shape


def test_attention_at_an_unreached_resolution_and_odd_widths_are_refused() -> None:
    """A resolution the network never reaches, or a width GroupNorm(32) cannot split, is an
    error that says which."""
    with pytest.raises(ValueError, match=r"\[12\] are never reached"):
        DDPMUNet(3, 3, hidden_size=32, attention_resolutions=(12,))
    with pytest.raises(ValueError, match="multiple of 32"):
        DDPMUNet(3, 3, hidden_size=48)


def gradients(checkpointing: bool, dropout: float) -> list[torch.Tensor]:
    """Every parameter's gradient of one training loss of a small paper network, seeded."""
    torch.manual_seed(0)
    net = DDPMUNet(3, 3, hidden_size=32, channel_mult=(1, 2), dropout=dropout)
    net.enable_gradient_checkpointing(checkpointing)
    model = DiffusionModel(net, num_timesteps=50)
    model(smooth_batch(0)).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_gradients(dropout: float) -> None:
    """model.checkpointing recomputes each stage's activations in the backward pass instead
    of keeping them, replaying its dropout masks: every gradient is the one kept activations
    give, bit for bit (with dropout too)."""
    kept, recomputed = gradients(False, dropout), gradients(True, dropout)
    assert all(torch.equal(a, b) for a, b in zip(kept, recomputed, strict=True))


def test_activation_checkpointing_recomputes_in_training_only() -> None:
    """Checkpointed stages run twice per training step (forward, then again in the backward
    pass) and once in eval mode or without gradients (sampling)."""
    net = DDPMUNet(3, 3, hidden_size=32, channel_mult=(1, 2))
    net.enable_gradient_checkpointing()
    calls = []
    net.mid[1].register_forward_hook(lambda *_: calls.append(1))  # the middle attention
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    net(x, t).sum().backward()
    assert len(calls) == 2
    net.eval()
    with torch.no_grad():
        net(x, t)
    assert len(calls) == 3


@pytest.mark.slow
def test_fifty_adam_steps_bring_loss_under_half() -> None:
    """The assignment's test for the paper's network too: 50 Adam steps (lr 5e-4, base 32,
    T=1000) on one batch of 4 images bring the loss (mean of 16 evaluations) under 0.5."""
    torch.manual_seed(0)
    model = DiffusionModel(DDPMUNet(3, 3, hidden_size=32, dropout=0.0), num_timesteps=1000)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    x = smooth_batch(0)
    first = statistics.mean(model(x).item() for _ in range(4))
    for _ in range(50):
        train_step(TrainingState(model, optimizer), x)
    with torch.no_grad():
        final = statistics.mean(model(x).item() for _ in range(16))
    assert final < 0.5 < first


def test_dropout_acts_in_training_only() -> None:
    """Two calls on the same input differ in train mode (dropout 0.5) and agree in eval mode,
    the mode every sampler runs in."""
    torch.manual_seed(0)
    net = DDPMUNet(3, 3, hidden_size=32, dropout=0.5)
    for p in net.parameters():  # the zero-initialised convs would hide the dropout
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 3, 32, 32), torch.rand(1)
    assert not torch.equal(net(x, t), net(x, t))
    net.eval()
    assert torch.equal(net(x, t), net(x, t))


@pytest.mark.parametrize(("saved", "loading"), [("ddpm", "assignment"), ("assignment", "ddpm")])
def test_a_checkpoint_of_one_network_is_refused_by_the_other(saved: str, loading: str) -> None:
    """Resuming a run's state with the other model.arch fails naming both networks and the
    setting, not with load_state_dict's list of missing keys."""
    sizes = {"model.hidden_size": 32, "model.channel_mult": (1, 2), "model.num_res_blocks": 1}
    snapshot = build_training(make_config({**sizes, "model.arch": saved}), 10).snapshot()
    state = build_training(make_config({**sizes, "model.arch": loading}), 10)
    with pytest.raises(CheckpointError, match=rf"holds the '{saved}' network.*'{loading}'"):
        state.restore(snapshot, "run/checkpoints/epoch_001.pt")


@pytest.mark.slow
def test_a_paper_network_run_trains_in_bf16_samples_from_its_ema_and_generates(
    tmp_path, cifar_writer
) -> None:
    """The pipeline around the network works for model.arch=ddpm: an epoch on the
    device-resident path in bf16 autocast, a grid from the EMA weights, an epoch checkpoint
    that ddpm.generate rebuilds (architecture record) and draws from."""
    cifar_writer(tmp_path / "data", images_per_batch=8)
    config = make_config(
        {
            "data.root": tmp_path / "data",
            "data.subset": 16,
            "data.loader": "device",
            "model.arch": "ddpm",
            "model.hidden_size": 32,
            "model.channel_mult": (1, 2),
            "model.num_res_blocks": 1,
            "train.precision": "bf16",
        }
    )
    data = TrainingData(load_dataset(config, locate_dataset(config.data)), config)
    state = build_training(config, data.steps_per_epoch)
    Trainer(state, data, config.train).epoch()
    grid = draw_samples(state, config.sample, config.image_shape, seed=0)
    assert grid.shape == (2, 3, 32, 32) and torch.isfinite(grid).all()
    run = RunDir(tmp_path / "run")
    save_epoch_checkpoint(state.snapshot(), run, keep=1)
    trained = load_trained_model(run.path)
    assert isinstance(trained.diffusion.eps_model, DDPMUNet) and trained.ema
    images = generate(trained.diffusion, range(2), trained.image_shape, config.sample, seed=0)
    assert images.shape == (2, 3, 32, 32)
