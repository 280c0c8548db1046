"""Pixel-shuffle downsampling (AP-BSN): breaks short-range spatial noise correlation.

With factor `pd`, the pixels (y, x) with the same (y % pd, x % pd) form one sub-image; a
blind-spot network run on each sub-image no longer sees the neighbours that share noise
with the pixel it predicts.
"""

from __future__ import annotations

import torch
from einops import rearrange


def pd_down(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * factor^2, C, H / factor, W / factor)."""
    if factor == 1:
        return x
    return rearrange(x, "b c (h fy) (w fx) -> (b fy fx) c h w", fy=factor, fx=factor)


def pd_up(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse of pd_down."""
    if factor == 1:
        return x
    return rearrange(x, "(b fy fx) c h w -> b c (h fy) (w fx)", fy=factor, fx=factor)
