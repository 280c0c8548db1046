"""The two attentions of a TBSN block, in the full (paper) and split (parity) layouts.

G-CSA (grouped channel self-attention) mixes channels with C x C weights computed from
statistics over the image. The reference sums those statistics over all positions, which
lets a little of the blind lattice leak in. Here each parity class (y % 2, x % 2) gets its
own weights, computed from positions of that class only, so the blind spot stays exact.

M-WSA (masked window self-attention) lets each query in an 8x8 window attend to an
overlapping 12x12 key window, keeping only keys at even offsets in both directions (a
dilation-2 receptive field), with a learned relative position embedding. In the split
layout a parity class's queries (a 4x4 window) and its kept keys (a 6x6 window) form an
ordinary window attention with nothing masked: the same logits, a quarter of the work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import DilatedConv3x3


class ParityChannelAttention(nn.Module):
    """G-CSA with exact blindness: channel attention computed per parity class.

    `block` (in pixels at this level's full-resolution layout; 0 for the whole image) limits
    the statistics to non-overlapping blocks, each with its own C x C weights.
    """

    def __init__(self, dim: int, heads: int, block: int = 0) -> None:
        super().__init__()
        self.heads = heads
        self.block = block
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_depthwise = DilatedConv3x3(dim * 3, dim * 3, groups=dim * 3)
        self.project = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor, split: bool = True) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = self.qkv_depthwise(self.qkv(x), split).chunk(3, dim=1)
        # Each (block, parity class) gets its own statistics. In the split layout every
        # batch item already is one parity class, at half the resolution.
        block = self.block // 2 if split else self.block
        block_h, block_w = (block, block) if block else ((height, width) if split else (height // 2, width // 2))
        if split:
            to_heads = "b (head c) (nh h) (nw w) -> b nh nw head c (h w)"
            from_heads = "b nh nw head c (h w) -> b (head c) (nh h) (nw w)"
            sizes = {"h": block_h, "w": block_w}
        else:
            to_heads = "b (head c) (nh h py) (nw w px) -> b nh nw py px head c (h w)"
            from_heads = "b nh nw py px head c (h w) -> b (head c) (nh h py) (nw w px)"
            block_h, block_w = (block // 2, block // 2) if block else (block_h, block_w)
            sizes = {"h": block_h, "w": block_w, "py": 2, "px": 2}
        q, k, v = (rearrange(t, to_heads, head=self.heads, **sizes) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        weights = (q @ k.transpose(-2, -1)) * self.temperature
        out = rearrange(weights.softmax(dim=-1) @ v, from_heads, **sizes)
        return self.project(out)


def _relative_offsets(window: int, key_window: int, padding: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-resolution offsets (key - query) along y and x for every (query, key) pair of a
    window, where one window pixel spans `step` image pixels."""
    query_pos = torch.arange(window)
    key_pos = torch.arange(key_window) - padding
    offset = step * (key_pos[None, :] - query_pos[:, None])  # (window, key_window)
    shape = (window, window, key_window, key_window)
    offset_y = offset[:, None, :, None].expand(shape).reshape(window * window, key_window * key_window)
    offset_x = offset[None, :, None, :].expand(shape).reshape(window * window, key_window * key_window)
    return offset_y, offset_x


class MaskedWindowAttention(nn.Module):
    """M-WSA: window queries, overlapping key windows, relative positions, dilation mask."""

    def __init__(self, dim: int, heads: int, head_dim: int, window: int, key_window: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.window = window
        self.key_window = key_window
        self.padding = (key_window - window) // 2
        inner = heads * head_dim
        self.query = nn.Conv2d(dim, inner, 1, bias=False)
        self.key_value = nn.Conv2d(dim, inner * 2, 1, bias=False)
        self.project = nn.Conv2d(inner, dim, 1, bias=False)
        reach = window - 1 + self.padding
        # Relative position embedding along each axis, content dependent (q . r), indexed by
        # the full-resolution offset.
        scale = head_dim**-0.5
        self.relative_y = nn.Parameter(torch.randn(2 * reach + 1, head_dim) * scale)
        self.relative_x = nn.Parameter(torch.randn(2 * reach + 1, head_dim) * scale)

        offset_y, offset_x = _relative_offsets(window, key_window, self.padding, step=1)
        self.register_buffer("full_index_y", offset_y + reach, persistent=False)
        self.register_buffer("full_index_x", offset_x + reach, persistent=False)
        # The dilation mask: keep keys at even offsets in both directions (the query itself
        # included), exactly the receptive field of a dilation-2 convolution.
        self.register_buffer("full_blocked", (offset_y % 2 != 0) | (offset_x % 2 != 0), persistent=False)
        # Split layout: half-size windows whose pixels are two image pixels apart.
        offset_y, offset_x = _relative_offsets(window // 2, key_window // 2, self.padding // 2, step=2)
        self.register_buffer("split_index_y", offset_y + reach, persistent=False)
        self.register_buffer("split_index_x", offset_x + reach, persistent=False)

    def forward(self, x: torch.Tensor, split: bool = True) -> torch.Tensor:
        height, width = x.shape[-2:]
        if split:
            window, key_window, padding = self.window // 2, self.key_window // 2, self.padding // 2
            index_y, index_x, blocked = self.split_index_y, self.split_index_x, None
        else:
            window, key_window, padding = self.window, self.key_window, self.padding
            index_y, index_x, blocked = self.full_index_y, self.full_index_x, self.full_blocked
        q = rearrange(
            self.query(x), "b (head d) (nh wy) (nw wx) -> (b nh nw) head (wy wx) d",
            head=self.heads, wy=window, wx=window,
        )
        key_value = F.unfold(self.key_value(x), key_window, stride=window, padding=padding)
        k, v = rearrange(
            key_value, "b (two head d kk) windows -> two (b windows) head kk d",
            two=2, head=self.heads, d=self.head_dim,
        )
        q = q * self.head_dim**-0.5
        logits = q @ k.transpose(-2, -1)
        # Relative position logits: q . r_y[dy] + q . r_x[dx], gathered per (query, key) pair.
        index_shape = (*q.shape[:-1], index_y.shape[-1])
        logits = logits + (q @ self.relative_y.t()).gather(-1, index_y.expand(index_shape))
        logits = logits + (q @ self.relative_x.t()).gather(-1, index_x.expand(index_shape))
        if blocked is not None:
            logits = logits.masked_fill(blocked, float("-inf"))
        out = logits.softmax(dim=-1) @ v
        out = rearrange(
            out, "(b nh nw) head (wy wx) d -> b (head d) (nh wy) (nw wx)",
            nh=height // window, nw=width // window, wy=window, wx=window,
        )
        return self.project(out)
