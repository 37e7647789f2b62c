"""The small U-Net of the course assignment, with its timestep-embedding broadcast bug fixed and
the embedding itself replaced by the DDPM paper's sinusoidal one (see TimestepEmbedding).

Shapes below use B = batch, C = channels, h = hidden_size, H = W = image side.
The network knows nothing of betas: it maps (x_t, t/T) to a noise estimate of the same shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 8  # GroupNorm(8) as in the assignment; every width must be divisible by it
DOWNSAMPLE = 32  # three max-pools (8x) then AvgPool2d(4) at the bottleneck (4x)


class ConvBlock(nn.Module):
    """conv3x3 -> GroupNorm(8) -> ReLU, then two more; optionally residual.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output (a multiple of 8).
        residual: add the first conv's output to the block's output, scaled by 1/sqrt(2)
            so the sum keeps roughly unit variance.
    """

    def __init__(self, in_channels: int, out_channels: int, residual: bool = False) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, 1, 1),
            nn.GroupNorm(GROUPS, out_channels),
            nn.ReLU(),
        )
        self.conv = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
            nn.GroupNorm(GROUPS, out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
            nn.GroupNorm(GROUPS, out_channels),
            nn.ReLU(),
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in, H, W) -> (B, out, H, W)."""
        x = self.main(x)
        if self.residual:
            return (x + self.conv(x)) / 2**0.5
        return self.conv(x)


class DownBlock(nn.Module):
    """ConvBlock then 2x max-pool: (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(ConvBlock(in_channels, out_channels), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UpBlock(nn.Module):
    """Concatenate the skip, 2x transposed conv, two ConvBlocks.

    (B, c_x, H, W) and skip (B, c_s, H, W) with c_x + c_s = in_channels -> (B, out, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 2, 2),
            ConvBlock(out_channels, out_channels),
            ConvBlock(out_channels, out_channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.model(torch.cat((x, skip), 1))


SCALE = 1000.0  # t in (0, 1] -> the timestep index of the DDPM paper's T = 1000
MAX_PERIOD = 10_000.0  # the Transformer's (and the DDPM reference code's) longest period


def timestep_frequencies(dim: int) -> torch.Tensor:
    """(dim / 2,) the sinusoids' frequencies, 1 down to 1 / MAX_PERIOD, geometrically."""
    half = dim // 2
    return torch.exp(-math.log(MAX_PERIOD) * torch.arange(half) / max(half - 1, 1))


def sinusoidal_embedding(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """t: (B,) float in (0, 1] -> (B, 2 * len(freqs)): sin and cos of t * SCALE * freqs."""
    angles = t.float().reshape(-1, 1) * SCALE * freqs  # (B, dim / 2)
    return torch.cat((angles.sin(), angles.cos()), dim=1)


AUGMENT_DIM = 1  # augmentation labels: [flipped] (EDM's geometric pipeline has 9)


class AugmentLabels(nn.Module):
    """EDM's map_augment (Karras et al. 2022, Appendix F): the augmentations an image had,
    (B, A) labels, mapped to the noise embedding's width and added to it. No bias: all-zero
    labels, as every sampler gives, add nothing, and the network draws un-augmented images
    while training still learns from augmented ones ("non-leaky" augmentation).

    Args:
        dim: A, the labels per image.
        emb_dim: the width of the embedding they are added to.
    """

    def __init__(self, dim: int, emb_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, emb_dim, bias=False)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels: (B, A) -> (B, emb_dim)."""
        return self.linear(labels.to(self.linear.weight.dtype))


class TimestepEmbedding(nn.Module):
    """The DDPM paper's sinusoidal timestep embedding, then a two-layer MLP (Ho et al. 2020,
    Appendix B, as in the Transformer's position embedding).

    The assignment's `sin(w·t)` with learned w started with |w| <= 1 on t in (0, 1], so it was
    nearly linear in t and gave the network almost no resolution between t = 1 and t = 100
    of 1000: the small noise levels the last sampling steps remove looked alike to it.

    Args:
        emb_dim: embedding width (2h in the U-Net, the bottleneck's channel count), even.
    """

    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        if emb_dim % 2:
            raise ValueError(f"emb_dim must be even (sin and cos halves), got {emb_dim}")
        self.register_buffer("freqs", timestep_frequencies(emb_dim), persistent=False)
        self.lin1 = nn.Linear(emb_dim, emb_dim)
        self.lin2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """t: (B,) float in (0, 1] -> (B, emb_dim, 1, 1), ready to add to a feature map;
        extra (B, emb_dim), the augmentation labels' embedding, is added before the MLP.

        The original code returned (B, emb_dim) and added it to a (B, emb_dim, 1, 1) map, which
        broadcast silently to (B, emb_dim, B, emb_dim).
        """
        emb = sinusoidal_embedding(t, self.freqs)  # (B, emb_dim)
        if extra is not None:
            emb = emb + extra
        emb = self.lin2(F.silu(self.lin1(emb)))  # (B, emb_dim)
        return emb[:, :, None, None]  # (B, emb_dim, 1, 1)


class UNet(nn.Module):
    """The assignment's U-Net: three down blocks, an average-pooled bottleneck, three up blocks.

    Args:
        in_channels: image channels C of the input x_t.
        out_channels: channels of the output (C: the noise estimate eps).
        hidden_size: base width h (a multiple of 8 for GroupNorm(8)); widths are h, 2h, 2h.

    Images must have sides that are multiples of 32 (32, 64, 128, 256, ... px).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_size: int = 128) -> None:
        super().__init__()
        if hidden_size <= 0 or hidden_size % GROUPS:
            raise ValueError(
                f"hidden_size must be a positive multiple of {GROUPS} (GroupNorm uses {GROUPS} "
                f"groups), got {hidden_size}"
            )
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"channels must be positive, got {in_channels=} {out_channels=}")
        h = hidden_size
        self.in_channels, self.out_channels, self.hidden_size = in_channels, out_channels, h

        self.init_conv = ConvBlock(in_channels, h, residual=True)
        self.down1 = DownBlock(h, h)
        self.down2 = DownBlock(h, 2 * h)
        self.down3 = DownBlock(2 * h, 2 * h)
        self.to_vec = nn.Sequential(nn.AvgPool2d(4), nn.ReLU())
        self.timestep_embedding = TimestepEmbedding(2 * h)
        self.up0 = nn.Sequential(
            nn.ConvTranspose2d(2 * h, 2 * h, 4, 4),
            nn.GroupNorm(GROUPS, 2 * h),
            nn.ReLU(),
        )
        self.up1 = UpBlock(4 * h, 2 * h)
        self.up2 = UpBlock(4 * h, h)
        self.up3 = UpBlock(2 * h, h)
        self.out = nn.Conv2d(2 * h, out_channels, 3, 1, 1)
        self.augment: AugmentLabels | None = None

    def enable_augment_labels(self, dim: int = AUGMENT_DIM) -> None:
        """Take augmentation labels (AugmentLabels) from now on: forward's `augment`."""
        self.augment = AugmentLabels(dim, 2 * self.hidden_size)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, augment: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise in x.

        Args:
            x: (B, C, H, W) noisy images x_t, H and W multiples of 32.
            t: (B,) float in (0, 1]: the timestep divided by the number of timesteps.
            augment: (B, A) augmentation labels, for a network that takes them; None = zeros.

        Returns:
            (B, out_channels, H, W) the noise estimate.
        """
        if x.ndim != 4 or x.shape[-1] % DOWNSAMPLE or x.shape[-2] % DOWNSAMPLE:
            raise ValueError(
                f"UNet expects (B, C, H, W) with H and W multiples of {DOWNSAMPLE}, "
                f"got {tuple(x.shape)}"
            )
        x = self.init_conv(x)  # (B, h, H, W)
        down1 = self.down1(x)  # (B, h, H/2, W/2)
        down2 = self.down2(down1)  # (B, 2h, H/4, W/4)
        down3 = self.down3(down2)  # (B, 2h, H/8, W/8)
        thro = self.to_vec(down3)  # (B, 2h, H/32, W/32)
        extra = self.augment(augment) if self.augment is not None and augment is not None else None
        temb = self.timestep_embedding(t, extra)  # (B, 2h, 1, 1)
        thro = self.up0(thro + temb)  # (B, 2h, H/8, W/8)
        up1 = self.up1(thro, down3) + temb  # (B, 2h, H/4, W/4)
        up2 = self.up2(up1, down2)  # (B, h, H/2, W/2)
        up3 = self.up3(up2, down1)  # (B, h, H, W)
        return self.out(torch.cat((up3, x), 1))  # (B, out, H, W)
