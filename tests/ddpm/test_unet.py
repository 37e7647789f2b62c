"""The assignment's U-Net: shapes, the timestep embedding (its broadcast fix and its resolution),
and bad widths."""

import pytest
import torch

from ddpm.unet import TimestepEmbedding, UNet


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_output_shape_equals_input_shape(size: int) -> None:
    """The assignment's test: hidden 128 maps (B, 3, S, S) to (B, 3, S, S) at 32..256 px."""
    torch.manual_seed(0)
    net = UNet(3, 3, hidden_size=128).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = net(x, torch.rand(1))
    assert out.shape == x.shape


def test_timestep_embedding_broadcasts_per_sample() -> None:
    """Regression: the embedding is (B, 2h, 1, 1), not (B, 2h) that broadcast to (B, 2h, B, 2h)."""
    emb = TimestepEmbedding(2 * 16)
    assert emb(torch.rand(5)).shape == (5, 32, 1, 1)


def test_samples_in_a_batch_do_not_mix() -> None:
    """Each sample's output depends only on its own x and t (the broadcast bug mixed them).
    In float64, so batched and one-by-one convolutions agree far inside the tolerance."""
    torch.manual_seed(0)
    net = UNet(3, 3, hidden_size=16).double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    with torch.no_grad():
        batched = net(x, t)
        single = torch.cat([net(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_timestep_changes_the_output() -> None:
    """The network is conditioned on t: the same x at two timesteps gives two outputs."""
    torch.manual_seed(0)
    net = UNet(3, 3, hidden_size=16).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(net(x, torch.tensor([0.1])), net(x, torch.tensor([0.9])))


@pytest.mark.parametrize("seed", range(3))
def test_timestep_embedding_resolves_small_timesteps(seed: int) -> None:
    """Neighbouring small timesteps (t = 1 and 2 of 1000) get embeddings at least a tenth as
    far apart as t = 1 and t = 1000 (measured 0.22-0.25; the assignment's sin(w t) with
    learned w gave 0.0011, so the last sampling steps all looked alike to the network)."""
    torch.manual_seed(seed)
    emb = TimestepEmbedding(64)
    with torch.no_grad():
        first, second, last = emb(torch.tensor([1.0, 2.0, 1000.0]) / 1000).flatten(1)
    assert (second - first).norm() > 0.1 * (last - first).norm()


@pytest.mark.parametrize("hidden", [0, 12, 100, -8])
def test_hidden_size_not_multiple_of_8_fails_clearly(hidden: int) -> None:
    """A width GroupNorm(8) cannot split fails at construction with a message saying why."""
    with pytest.raises(ValueError, match="multiple of 8"):
        UNet(3, 3, hidden_size=hidden)


def test_image_side_not_multiple_of_32_fails_clearly() -> None:
    """A 48 px image is refused with a message naming the rule, not a shape traceback."""
    net = UNet(3, 3, hidden_size=8)
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.randn(1, 3, 48, 48), torch.rand(1))


def test_grayscale_in_and_out_channels() -> None:
    """in/out channels are honoured (1-channel images)."""
    net = UNet(1, 1, hidden_size=8)
    assert net(torch.randn(2, 1, 32, 32), torch.rand(2)).shape == (2, 1, 32, 32)
