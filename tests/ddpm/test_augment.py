"""Non-leaky flips (model.augment_labels, EDM Appendix F): the network is told which training
images were mirrored, the label is zero when sampling and then adds nothing, the data path
leaves the flipping to the training step, and the flips are drawn with t and eps."""

from __future__ import annotations

import pytest
import torch

from ddpm.batches import TrainingData
from ddpm.build import build_network
from ddpm.config import ModelConfig
from ddpm.datasets import TensorImageDataset
from ddpm.diffusion import DiffusionModel


@pytest.mark.parametrize("arch", ["assignment", "ddpm"])
def test_zero_labels_add_nothing_and_ones_change_the_output(arch: str) -> None:
    """A network that takes augmentation labels gives, with all-zero labels (sampling) or
    none, exactly the output of the same weights without the labels' layer; label 1 (a
    mirrored image) changes it."""
    torch.manual_seed(0)
    model = ModelConfig(arch=arch, hidden_size=32, channel_mult=(1, 2), attention_resolutions=())
    labelled = build_network(ModelConfig(**{**model.__dict__, "augment_labels": True}), 32)
    plain = build_network(model, 32)
    state = {k: v for k, v in labelled.state_dict().items() if not k.startswith("augment.")}
    with torch.no_grad():  # the paper's network zeroes its last layers at the start
        for value in labelled.state_dict().values():
            if value.is_floating_point():
                value.normal_(0, 0.2)
    state = {k: v for k, v in labelled.state_dict().items() if not k.startswith("augment.")}
    plain.load_state_dict(state)
    labelled.eval(), plain.eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        expected = plain(x, t)
        assert torch.equal(labelled(x, t), expected)
        assert torch.equal(labelled(x, t, torch.zeros(2, 1)), expected)
        assert not torch.allclose(labelled(x, t, torch.ones(2, 1)), expected)


def test_the_training_step_flips_and_labels_its_images() -> None:
    """With labels, draw_training_noise adds flips (about half of them), and the loss of an
    image drawn flipped is the loss of its mirror told label 1; unflipped, label 0."""
    torch.manual_seed(0)
    network = build_network(ModelConfig(hidden_size=8, augment_labels=True), 32)
    model = DiffusionModel(network, num_timesteps=20)
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    t, eps, flips = model.draw_training_noise(torch.zeros(4000, 1, 1, 1))
    assert flips.dtype == torch.bool and 0.45 < flips.float().mean() < 0.55
    t, eps = t[:4], torch.randn_like(x0)
    yes, no = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    mirrored = model(x0, t, eps, yes)
    x_t = model.q_sample(x0.flip(-1), t, eps)
    output = network(x_t, model._net_time(t), torch.ones(4, 1))
    assert torch.allclose(mirrored, (output - eps).square().mean(), rtol=1e-5)  # eps: target
    plain = DiffusionModel(build_network(ModelConfig(hidden_size=8), 32), num_timesteps=20)
    plain.eps_model.load_state_dict(
        {k: v for k, v in network.state_dict().items() if not k.startswith("augment.")}
    )
    assert torch.allclose(model(x0, t, eps, no), plain(x0, t, eps))


def test_the_data_leaves_the_flips_to_the_training_step(tiny_config) -> None:
    """With model.augment_labels the batches are never mirrored by the data path (the step
    mirrors and labels them); without, data.random_flip mirrors them there as before."""
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    dataset = TensorImageDataset(images)
    labelled = TrainingData(dataset, tiny_config({"model.augment_labels": True}))
    unflipped = TrainingData(dataset, tiny_config({"data.random_flip": False}))
    flipped = TrainingData(dataset, tiny_config())
    a, b, c = (list(d.epoch(1)) for d in (labelled, unflipped, flipped))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
