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

Both work on the (B, H, W, C) view of channels-last features (see layers.py): heads and
windows are cut from it without changing the memory order, and the products read the
pixel-major tensors transposed where the formula has them channel-major.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import DilatedConv3x3, PointwiseConv2d, from_pixels, to_pixels


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
        self.qkv = PointwiseConv2d(dim, dim * 3)
        self.qkv_depthwise = DilatedConv3x3(dim * 3, dim * 3, groups=dim * 3)
        self.project = PointwiseConv2d(dim, dim)

    def forward(self, x: torch.Tensor, split: bool = True) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = to_pixels(self.qkv_depthwise(self.qkv(x), split)).chunk(3, dim=-1)
        # Each (block, parity class) gets its own statistics. In the split layout every
        # batch item already is one parity class, at half the resolution.
        block = self.block // 2 if split else self.block
        block_h, block_w = (block, block) if block else ((height, width) if split else (height // 2, width // 2))
        if split:
            to_heads = "b (nh h) (nw w) (head c) -> b nh nw head (h w) c"
            from_heads = "b nh nw head (h w) c -> b (nh h) (nw w) (head c)"
            sizes = {"h": block_h, "w": block_w}
        else:
            to_heads = "b (nh h py) (nw w px) (head c) -> b nh nw py px head (h w) c"
            from_heads = "b nh nw py px head (h w) c -> b (nh h py) (nw w px) (head c)"
            block_h, block_w = (block // 2, block // 2) if block else (block_h, block_w)
            sizes = {"h": block_h, "w": block_w, "py": 2, "px": 2}
        q, k, v = (rearrange(t, to_heads, head=self.heads, **sizes) for t in (q, k, v))
        # Cosine similarity of channels over the block's positions (the rows here): the product
        # of the raw channels divided by their norms, which spares normalising q and k themselves
        # (F.normalize's division, eps included, moved onto the C x C product).
        norms_q = torch.linalg.vector_norm(q, dim=-2).clamp_min(1e-12)
        norms_k = torch.linalg.vector_norm(k, dim=-2).clamp_min(1e-12)
        if q.dtype == torch.float16:  # raw sums over a block's positions can pass float16's range
            with torch.autocast(q.device.type, enabled=False):
                product = q.float().transpose(-2, -1) @ k.float()
        else:
            product = q.transpose(-2, -1) @ k
        weights = (product / (norms_q[..., :, None] * norms_k[..., None, :]) * self.temperature).to(v.dtype)
        out = v @ weights.softmax(dim=-1).transpose(-2, -1)  # each position's channels mixed
        return self.project(from_pixels(rearrange(out, from_heads, **sizes).contiguous()))


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


def overlapping_windows(pixels: torch.Tensor, window: int, padding: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/window, key, W/window, key, C): each window with `padding` pixels of
    its neighbours on every side (zeros beyond the image), key = window + 2 padding; what
    F.unfold(kernel=key, stride=window, padding=padding) gives, but cut from the windows and
    their neighbours' edges, whose gradient is a sum of slices instead of unfold's scatter."""
    if padding > window:  # reaches past the neighbouring window (no preset does)
        padded = F.pad(pixels, (0, 0, padding, padding, padding, padding))
        key = window + 2 * padding
        return padded.unfold(1, key, window).unfold(2, key, window).permute(0, 1, 4, 2, 5, 3)

    def with_halo(blocks: torch.Tensor, axis: int) -> torch.Tensor:
        # `blocks` has the windows along `axis` and the pixels within a window along axis + 1.
        if not padding:
            return blocks
        zeros = blocks.new_zeros(blocks.shape[:axis] + (1, padding) + blocks.shape[axis + 2:])
        before = torch.cat([zeros, blocks.narrow(axis, 0, blocks.shape[axis] - 1).narrow(axis + 1, window - padding,
                                                                                           padding)], dim=axis)
        after = torch.cat([blocks.narrow(axis, 1, blocks.shape[axis] - 1).narrow(axis + 1, 0, padding), zeros],
                          dim=axis)
        return torch.cat([before, blocks, after], dim=axis + 1)

    rows = with_halo(pixels.unflatten(1, (-1, window)), 1)  # (B, nh, key, W, C)
    return with_halo(rows.unflatten(3, (-1, window)), 3)  # (B, nh, key, nw, key, C)


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
        self.query = PointwiseConv2d(dim, inner)
        self.key_value = PointwiseConv2d(dim, inner * 2)
        self.project = PointwiseConv2d(inner, dim)
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
            window, padding = self.window // 2, self.padding // 2
            index_y, index_x, blocked = self.split_index_y, self.split_index_x, None
        else:
            window, padding = self.window, self.padding
            index_y, index_x, blocked = self.full_index_y, self.full_index_x, self.full_blocked
        q = rearrange(
            to_pixels(self.query(x)), "b (nh wy) (nw wx) (head d) -> (b nh nw) head (wy wx) d",
            head=self.heads, wy=window, wx=window,
        )
        key_value = overlapping_windows(to_pixels(self.key_value(x)), window, padding)
        k, v = rearrange(
            key_value, "b nh ky nw kx (two head d) -> two (b nh nw) head (ky kx) d",
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
            out, "(b nh nw) head (wy wx) d -> b (nh wy) (nw wx) (head d)",
            nh=height // window, nw=width // window, wy=window, wx=window,
        )
        return self.project(from_pixels(out.contiguous()))
