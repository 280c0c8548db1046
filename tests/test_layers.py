"""The network's fast forms against the plain formulas they replace (network/layers.py,
network/attention.py): the same function, in float64 to rounding, and the channels-last layout
kept through the network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from napari_tbsn.network.attention import ParityChannelAttention, overlapping_windows
from napari_tbsn.network.layers import (BiasFreeLayerNorm, PointwiseConv2d, _BiasFreeNorm, merge_parity,
                                        split_parity)
from napari_tbsn.network.tbsn import TBSN


def _plain_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    centred = x - x.mean(dim=1, keepdim=True)
    return x * torch.rsqrt((centred * centred).mean(dim=1, keepdim=True) + eps) * weight.view(1, -1, 1, 1)


def test_norm_matches_the_formula_and_its_gradient_is_exact():
    torch.manual_seed(0)
    norm = BiasFreeLayerNorm(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(2, 6, 5, 4, dtype=torch.float64) + 3.0).requires_grad_()  # not centred
    assert torch.allclose(norm(x), _plain_norm(x, norm.weight), rtol=0, atol=1e-13)
    # The hand-written gradient against finite differences, for the input and the weight.
    assert torch.autograd.gradcheck(lambda a, w: _BiasFreeNorm.apply(a, w, 1e-5, a.dtype), (x, norm.weight))


def test_norm_under_autocast_gives_the_autocast_dtype_from_float32_statistics():
    torch.manual_seed(1)
    norm = BiasFreeLayerNorm(8)
    x = torch.randn(1, 8, 4, 4) * 300  # squares past float16's range: statistics must be float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), _plain_norm(x, norm.weight), rtol=1e-2, atol=1e-2)


def test_pointwise_conv_is_the_1x1_convolution():
    torch.manual_seed(2)
    pointwise = PointwiseConv2d(5, 7, bias=True).double()
    x = torch.randn(2, 5, 6, 4, dtype=torch.float64)
    expected = F.conv2d(x, pointwise.weight, pointwise.bias)
    assert torch.allclose(pointwise(x), expected, rtol=0, atol=1e-13)
    assert pointwise(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("window, padding", [(4, 1), (2, 1), (4, 2), (4, 0), (2, 3)])
def test_overlapping_windows_are_unfolds_windows(window, padding):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 4 * window, 3 * window, dtype=torch.float64)
    key = window + 2 * padding
    unfolded = F.unfold(x, key, stride=window, padding=padding)  # zeros beyond the image, as in the network
    expected = rearrange(unfolded, "b (c ky kx) (nh nw) -> b nh ky nw kx c", c=5, ky=key, kx=key, nh=4)
    assert torch.equal(overlapping_windows(x.permute(0, 2, 3, 1), window, padding), expected)


def _normalised_channel_attention(attention: ParityChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """The split-layout G-CSA as first written: q and k normalised over positions, then multiplied."""
    q, k, v = attention.qkv_depthwise(F.conv2d(x, attention.qkv.weight), True).chunk(3, dim=1)
    heads = attention.heads
    q, k, v = (rearrange(t, "b (head c) h w -> b head c (h w)", head=heads) for t in (q, k, v))
    weights = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * attention.temperature
    out = rearrange(weights.softmax(dim=-1) @ v, "b head c (h w) -> b (head c) h w", h=x.shape[-2])
    return F.conv2d(out, attention.project.weight)


def test_channel_attention_matches_normalising_q_and_k():
    torch.manual_seed(4)
    attention = ParityChannelAttention(8, heads=2).double()
    with torch.no_grad():
        attention.temperature.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 6, 10, dtype=torch.float64)
    assert torch.allclose(attention(x, True), _normalised_channel_attention(attention, x), rtol=0, atol=1e-12)


def test_parity_split_round_trips_channels_last():
    x = torch.randn(2, 3, 8, 12)
    split = split_parity(x)
    assert split.is_contiguous(memory_format=torch.channels_last)
    # Item (py, px, b) of the split batch is parity class (py, px) of image b.
    assert torch.equal(split[2], x[0, :, 0::2, 1::2]) and torch.equal(split[4 + 1], x[1, :, 1::2, 0::2])
    assert torch.equal(merge_parity(split), x)


def test_the_network_keeps_features_channels_last():
    """A reshuffle that fell back to NCHW would still compute the same function, only slowly:
    every transformer block must see channels-last features."""
    network = TBSN.from_preset("tiny")
    seen = []
    for block in network.modules():
        if type(block).__name__ == "TransformerBlock":
            block.register_forward_pre_hook(
                lambda module, inputs: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    network(torch.randn(1, 1, 64, 64))
    assert seen and all(seen)
