"""The U-Net of the DDPM paper (Ho et al. 2020, Appendix B) and of its reference code
(diffusion_tf/models/unet.py): a PixelCNN++-style backbone of wide residual blocks with
GroupNorm(32), the sinusoidal timestep embedding through a two-layer MLP into every residual
block, self-attention at chosen resolutions, and dropout.

For CIFAR-10 the paper uses base width 128, multipliers (1, 2, 2, 2) over the resolutions
32, 16, 8, 4, two residual blocks per resolution, attention at 16x16 and dropout 0.1: 35.7 M
parameters. Shapes: B = batch, C = channels, H = W = image side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpm.unet import AUGMENT_DIM, AugmentLabels, sinusoidal_embedding, timestep_frequencies

GROUPS = 32  # GroupNorm(32), as the reference code


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, + the timestep embedding, norm -> swish -> dropout -> conv3x3,
    added to the input (through a 1x1 conv where the width changes).

    Args:
        in_channels, out_channels: widths in and out (multiples of 32).
        temb_channels: width of the timestep embedding.
        dropout: probability, applied in training only.
    """

    def __init__(
        self, in_channels: int, out_channels: int, temb_channels: int, dropout: float
    ) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2, self.dropout = _norm(out_channels), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        nn.init.zeros_(self.conv2.weight)  # the reference code starts each block as identity
        nn.init.zeros_(self.conv2.bias)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (B, in, H, W), temb: (B, temb_channels) -> (B, out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, added to the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).reshape(b, 3, c, height * width).transpose(-1, -2).unbind(1)
        )
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj_out(h.transpose(-1, -2).reshape(b, c, height, width))


class Downsample(nn.Module):
    """conv3x3 with stride 2 (the reference pads right and bottom by one): H -> H/2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then conv3x3: H -> 2H."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DDPMUNet(nn.Module):
    """The DDPM paper's U-Net.

    Args:
        in_channels: image channels C of the input x_t.
        out_channels: channels of the output (C: the noise estimate eps).
        hidden_size: base width ch (a multiple of 32); level i is ch * channel_mult[i] wide.
        channel_mult: width multipliers, one per resolution; each level after the first halves
            the resolution.
        num_res_blocks: residual blocks per resolution on the way down (one more on the way
            up, which also takes the skip connections).
        attention_resolutions: image sides (16 for 16x16) at which blocks attend.
        dropout: in every residual block, in training only.
        image_size: the side the network is built for (to place attention).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_size: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        ch, levels = hidden_size, len(channel_mult)
        if ch <= 0 or ch % GROUPS:
            raise ValueError(f"hidden_size must be a positive multiple of {GROUPS}, got {ch}")
        reached = [image_size >> i for i in range(levels)]
        missing = sorted(set(attention_resolutions) - set(reached))
        if missing:
            raise ValueError(
                f"attention_resolutions {missing} are never reached: an image of {image_size} "
                f"px passes through {reached}"
            )
        self.downsample = 2 ** (levels - 1)
        temb_ch = 4 * ch
        self.register_buffer("freqs", timestep_frequencies(ch), persistent=False)  # (ch / 2,)
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)

        def stage(c_in: int, c_out: int, side: int) -> nn.ModuleList:
            block = [ResnetBlock(c_in, c_out, temb_ch, dropout)]
            return nn.ModuleList(
                block + ([AttnBlock(c_out)] if side in attention_resolutions else [])
            )

        self.down = nn.ModuleList()
        widths, width = [ch], ch
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(stage(width, ch * mult, reached[i]))
                width = ch * mult
                widths.append(width)
            if i != levels - 1:
                self.down.append(nn.ModuleList([Downsample(width)]))
                widths.append(width)
        self.mid = nn.ModuleList(
            [ResnetBlock(width, width, temb_ch, dropout), AttnBlock(width),
             ResnetBlock(width, width, temb_ch, dropout)]
        )  # fmt: skip
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(stage(width + widths.pop(), ch * mult, reached[i]))
                width = ch * mult
            if i != 0:
                self.up.append(nn.ModuleList([Upsample(width)]))
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, 1, 1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.gradient_checkpointing = False
        self.augment: AugmentLabels | None = None

    def enable_augment_labels(self, dim: int = AUGMENT_DIM) -> None:
        """Take augmentation labels (ddpm.unet.AugmentLabels) from now on: forward's
        `augment`, added to the sinusoidal embedding before its MLP (as EDM's DDPM++)."""
        self.augment = AugmentLabels(dim, self.freqs.numel() * 2)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Keep only each stage's input during training and recompute its activations in the
        backward pass (torch.utils.checkpoint): less memory for about a third more compute,
        the same gradients (dropout masks are replayed). As diffusers' models name it."""
        self.gradient_checkpointing = enabled

    def _run(self, layers: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._stage, layers, h, temb, use_reentrant=False)
        return self._stage(layers, h, temb)

    @staticmethod
    def _stage(layers: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, temb) if isinstance(layer, ResnetBlock) else layer(h)
        return h

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, augment: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise in x.

        Args:
            x: (B, C, H, W) noisy images x_t, H and W multiples of 2 ** (levels - 1).
            t: (B,) float in (0, 1]: the timestep divided by the number of timesteps.
            augment: (B, A) augmentation labels, for a network that takes them; None = zeros.

        Returns:
            (B, out_channels, H, W) the noise estimate.
        """
        if x.ndim != 4 or x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(
                f"DDPMUNet expects (B, C, H, W) with H and W multiples of {self.downsample}, "
                f"got {tuple(x.shape)}"
            )
        emb = sinusoidal_embedding(t, self.freqs)  # (B, ch)
        if self.augment is not None and augment is not None:
            emb = emb + self.augment(augment)
        temb = self.temb(emb)  # (B, 4ch)
        hs = [self.conv_in(x)]  # (B, ch, H, W)
        for layers in self.down:
            hs.append(self._run(layers, hs[-1], temb))
        h = self._run(self.mid, hs[-1], temb)  # (B, ch * mult[-1], H / 2^(L-1), ...)
        for layers in self.up:
            if isinstance(layers[0], ResnetBlock):
                h = torch.cat((h, hs.pop()), 1)
            h = self._run(layers, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out, H, W)
