"""Small layers that keep the blind spot: every one of them lets a feature at position p
read only features at p + 2Z^2 (both offsets even), except the centre-masked input conv.

Every layer after the input conv runs in one of two equivalent layouts:
- "full": the paper's layout, features at full resolution, dilation-2 convolutions;
- "split": each parity class (y % 2, x % 2) as its own half-resolution image in the batch,
  where a dilation-2 convolution becomes an ordinary 3x3 convolution. The same weights give
  the same function (a float64 test checks it) with a quarter of the attention work.
The network runs split; the full layout is kept as the readable reference.

Memory layout: features are (B, C, H, W) tensors stored channels last (each pixel's channels
side by side), and every reshuffle below is written on the (B, H, W, C) view and keeps that
order. oneDNN runs convolutions on such tensors several times faster than on NCHW ones in
bfloat16 (see docs/measurements.md), and 1x1 convolutions become plain matrix products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The same tensor stored channels last (a no-op when it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> its (B, H, W, C) view: no copy for a channels-last tensor."""
    return x.permute(0, 2, 3, 1)


def from_pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> its (B, C, H, W) view, channels last when `x` is contiguous."""
    return x.permute(0, 3, 1, 2)


def rearrange_pixels(x: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """einops `pattern` applied to the (B, H, W, C) view of `x` and its result given back as
    (B, C, H, W), stored channels last: a reshuffle that keeps the layout."""
    return from_pixels(rearrange(to_pixels(x), pattern, **sizes).contiguous())


class PointwiseConv2d(nn.Conv2d):
    """A bias-free (unless asked) 1x1 convolution computed as a matrix product over each
    pixel's channels: the same weights and result as nn.Conv2d(..., 1), without oneDNN's
    layout reorders."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise(x, self.weight, self.bias)


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1x1 convolution of (B, C, H, W) by an (out, C, 1, 1) weight, result stored channels last."""
    return from_pixels(F.linear(to_pixels(x), weight.flatten(1), bias))


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
    return rearrange_pixels(x, "b (h py) (w px) c -> (py px b) h w c", py=2, px=2)


def merge_parity(x: torch.Tensor) -> torch.Tensor:
    """The inverse of split_parity."""
    return rearrange_pixels(x, "(py px b) h w c -> b (h py) (w px) c", py=2, px=2)


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
    """LayerNorm over channels at each position, with a scale and no bias (Restormer style):
    x / sqrt(var(x) + eps) * weight, x itself not centred."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast a float32 result goes straight to the layers after it in their reduced
        # precision, which they would cast it to anyway (one pass over the features less).
        reduced = _autocast_dtype(x.device.type) if x.dtype == torch.float32 else None
        return _BiasFreeNorm.apply(x, self.weight, self.eps, reduced or x.dtype)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs in on this device type now, or None when it is off (or unknown to
    this torch, as MPS is to some versions)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:
        return None


class _BiasFreeNorm(torch.autograd.Function):
    """The norm with its gradient written out: autograd's chain of a dozen element-wise steps
    over full-size tensors becomes a few passes (timings in docs/measurements.md).
    The statistics in at least float32: squared float16 activations overflow past 256."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        mean = wide.mean(dim=1, keepdim=True)
        centred = wide - mean
        inverse_std = torch.rsqrt((centred * centred).mean(dim=1, keepdim=True) + eps)
        scaled = wide * inverse_std
        ctx.save_for_backward(scaled, inverse_std, mean, weight)
        ctx.input_dtype = x.dtype
        return (scaled * weight.view(1, -1, 1, 1)).to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative would need the saved tensors' own
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        # y = w s with s = x r, r = (var + eps)^-1/2 and d var / dx = 2 (x - mean) / C. With
        # g = w dy and m = mean_C(g s): dx = r g - r m (x - mean) r = r g - r m s + r m mean r,
        # and dw = the sum over pixels of dy s: a few passes over s, not autograd's dozen.
        scaled, inverse_std, mean, weight = ctx.saved_tensors
        grad = grad_output.to(scaled.dtype)
        grad_weight = (grad * scaled).sum(dim=(0, 2, 3))
        grad = grad * weight.view(1, -1, 1, 1).to(scaled.dtype)
        projection = inverse_std * (grad * scaled).mean(dim=1, keepdim=True)
        grad_input = torch.addcmul(projection * mean * inverse_std, grad, inverse_std) - projection * scaled
        return grad_input.to(ctx.input_dtype), grad_weight.to(weight.dtype), None, None


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
        self.reduce = PointwiseConv2d(dim, dim // 2)

    def forward(self, x: torch.Tensor, split: bool = True) -> torch.Tensor:
        x = self.reduce(x)
        if split:  # within one parity class this is a plain pixel unshuffle
            return rearrange_pixels(x, "b (cell_y pair_y) (cell_x pair_x) c -> b cell_y cell_x (c pair_y pair_x)",
                                    pair_y=2, pair_x=2)
        return rearrange_pixels(
            x, "b (cell_y pair_y py) (cell_x pair_x px) c -> b (cell_y py) (cell_x px) (c pair_y pair_x)",
            pair_y=2, py=2, pair_x=2, px=2,
        )


class ParityUpsample(nn.Module):
    """The inverse of ParityDownsample: double H and W, halving the channels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = PointwiseConv2d(dim, dim * 2)

    def forward(self, x: torch.Tensor, split: bool = True) -> torch.Tensor:
        x = self.expand(x)
        if split:
            return rearrange_pixels(x, "b cell_y cell_x (c pair_y pair_x) -> b (cell_y pair_y) (cell_x pair_x) c",
                                    pair_y=2, pair_x=2)
        return rearrange_pixels(
            x, "b (cell_y py) (cell_x px) (c pair_y pair_x) -> b (cell_y pair_y py) (cell_x pair_x px) c",
            pair_y=2, py=2, pair_x=2, px=2,
        )
