"""Small layers that keep the blind spot: every one of them lets a feature at position p
read only features at p + 2Z^2 (both offsets even), except the centre-masked input conv.

Every layer after the input conv runs in one of two equivalent layouts:
- "full": the paper's layout, features at full resolution, dilation-2 convolutions;
- "split": each parity class (y % 2, x % 2) as its own half-resolution image in the batch,
  where a dilation-2 convolution becomes an ordinary 3x3 convolution. The same weights give
  the same function (a float64 test checks it) with a quarter of the attention work.
The network runs split; the full layout is kept as the readable reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class CentreMaskedConv2d(nn.Conv2d):
    """3x3 convolution whose centre tap is zero: the only layer that creates the blind spot.

    The mask multiplies the weight inside forward (never the stored parameter), so no saved,
    loaded or exported weight can switch the centre pixel back on.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        mask = torch.ones(1, 1, 3, 3)
        mask[..., 1, 1] = 0
        self.register_buffer("centre_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.centre_mask, None, padding=1)


def split_parity(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) full resolution -> (4B, C, H/2, W/2), one image per parity class."""
    return rearrange(x, "b c (h py) (w px) -> (py px b) c h w", py=2, px=2)


def merge_parity(x: torch.Tensor) -> torch.Tensor:
    """The inverse of split_parity."""
    return rearrange(x, "(py px b) c h w -> b c (h py) (w px)", py=2, px=2)


class DilatedConv3x3(nn.Module):
    """3x3 convolution with dilation 2 (full layout), i.e. a plain 3x3 conv (split layout)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor, split: bool = True) -> torch.Tensor:
        step = 1 if split else 2
        return F.conv2d(x, self.weight, None, padding=step, dilation=step, groups=self.groups)


class BiasFreeLayerNorm(nn.Module):
    """LayerNorm over channels at each position, with a scale and no bias (Restormer style)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The statistics in at least float32: squared float16 activations overflow past 256.
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        centred = wide - wide.mean(dim=1, keepdim=True)
        variance = (centred * centred).mean(dim=1, keepdim=True)
        return (wide * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight.view(1, -1, 1, 1)


class FeedForward(nn.Module):
    """Two dense dilation-2 3x3 convolutions with GELU between."""

    def __init__(self, dim: int, expansion: float) -> None:
        super().__init__()
        hidden = max(1, round(dim * expansion))
        self.expand = DilatedConv3x3(dim, hidden)
        self.project = DilatedConv3x3(hidden, dim)

    def forward(self, x: torch.Tensor, split: bool = True) -> torch.Tensor:
        return self.project(F.gelu(self.expand(x, split)), split)


class ParityDownsample(nn.Module):
    """Halve H and W without mixing parity classes.

    A 4x4 block holds four pixels of each parity class (y % 2, x % 2); the four pixels of
    one class go into one low-resolution cell, and that cell keeps the class as its own
    parity. (PixelUnshuffle(2) would put all four classes into one cell.)
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, dim // 2, 1, bias=False)

    def forward(self, x: torch.Tensor, split: bool = True) -> torch.Tensor:
        x = self.reduce(x)
        if split:  # within one parity class this is a plain pixel unshuffle
            return rearrange(x, "b c (cell_y pair_y) (cell_x pair_x) -> b (c pair_y pair_x) cell_y cell_x",
                             pair_y=2, pair_x=2)
        return rearrange(
            x, "b c (cell_y pair_y py) (cell_x pair_x px) -> b (c pair_y pair_x) (cell_y py) (cell_x px)",
            pair_y=2, py=2, pair_x=2, px=2,
        )


class ParityUpsample(nn.Module):
    """The inverse of ParityDownsample: double H and W, halving the channels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(dim, dim * 2, 1, bias=False)

    def forward(self, x: torch.Tensor, split: bool = True) -> torch.Tensor:
        x = self.expand(x)
        if split:
            return rearrange(x, "b (c pair_y pair_x) cell_y cell_x -> b c (cell_y pair_y) (cell_x pair_x)",
                             pair_y=2, pair_x=2)
        return rearrange(
            x, "b (c pair_y pair_x) (cell_y py) (cell_x px) -> b c (cell_y pair_y py) (cell_x pair_x px)",
            pair_y=2, py=2, pair_x=2, px=2,
        )
