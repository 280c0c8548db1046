"""The two attentions of a TBSN block.

G-CSA (grouped channel self-attention) mixes channels with C x C weights computed from
statistics over the image. The reference sums those statistics over all positions, which
lets a little of the blind lattice leak in. Here each parity class (y % 2, x % 2) gets its
own weights, computed from positions of that class only, so the blind spot stays exact.

M-WSA (masked window self-attention) lets each query in an 8x8 window attend to an
overlapping 12x12 key window, keeping only keys at even offsets in both directions (a
dilation-2 receptive field), with a learned relative position embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import dilated_conv3x3


class ParityChannelAttention(nn.Module):
    """G-CSA with exact blindness: channel attention computed per parity class."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_depthwise = dilated_conv3x3(dim * 3, dim * 3, groups=dim * 3)
        self.project = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = self.qkv_depthwise(self.qkv(x)).chunk(3, dim=1)
        split = "b (head c) (h py) (w px) -> b py px head c (h w)"
        q, k, v = (rearrange(t, split, head=self.heads, py=2, px=2) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        weights = (q @ k.transpose(-2, -1)) * self.temperature
        out = weights.softmax(dim=-1) @ v
        out = rearrange(out, "b py px head c (h w) -> b (head c) (h py) (w px)", h=height // 2, w=width // 2)
        return self.project(out)


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

        # Offset of key (ky, kx) from query (qy, qx), in image pixels.
        query_pos = torch.arange(window)
        key_pos = torch.arange(key_window) - self.padding
        offset = key_pos[None, :] - query_pos[:, None]  # (window, key_window)
        reach = window - 1 + self.padding
        offset_y = offset[:, None, :, None].expand(window, window, key_window, key_window)
        offset_x = offset[None, :, None, :].expand(window, window, key_window, key_window)
        offset_y = offset_y.reshape(window * window, key_window * key_window)
        offset_x = offset_x.reshape(window * window, key_window * key_window)
        self.register_buffer("offset_index_y", offset_y + reach, persistent=False)
        self.register_buffer("offset_index_x", offset_x + reach, persistent=False)
        # The dilation mask: keep keys at even offsets in both directions (the query itself
        # included), exactly the receptive field of a dilation-2 convolution.
        blocked = (offset_y % 2 != 0) | (offset_x % 2 != 0)
        self.register_buffer("blocked", blocked, persistent=False)
        # Relative position embedding along each axis, content dependent (q . r).
        scale = head_dim**-0.5
        self.relative_y = nn.Parameter(torch.randn(2 * reach + 1, head_dim) * scale)
        self.relative_x = nn.Parameter(torch.randn(2 * reach + 1, head_dim) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        window = self.window
        q = rearrange(
            self.query(x), "b (head d) (nh wy) (nw wx) -> (b nh nw) head (wy wx) d",
            head=self.heads, wy=window, wx=window,
        )
        key_value = F.unfold(self.key_value(x), self.key_window, stride=window, padding=self.padding)
        k, v = rearrange(
            key_value, "b (two head d kk) windows -> two (b windows) head kk d",
            two=2, head=self.heads, d=self.head_dim,
        )
        q = q * self.head_dim**-0.5
        logits = q @ k.transpose(-2, -1)
        # Relative position logits: q . r_y[dy] + q . r_x[dx], gathered per (query, key) pair.
        rel_y = q @ self.relative_y.t()  # (..., queries, offsets)
        rel_x = q @ self.relative_x.t()
        index_shape = (*q.shape[:-1], self.offset_index_y.shape[-1])
        logits = logits + rel_y.gather(-1, self.offset_index_y.expand(index_shape))
        logits = logits + rel_x.gather(-1, self.offset_index_x.expand(index_shape))
        logits = logits.masked_fill(self.blocked, float("-inf"))
        out = logits.softmax(dim=-1) @ v
        out = rearrange(
            out, "(b nh nw) head (wy wx) d -> b (head d) (nh wy) (nw wx)",
            nh=height // window, nw=width // window, wy=window, wx=window,
        )
        return self.project(out)
