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


def test_norm_keeps_float32_statistics_for_half_inputs_and_hands_on_autocasts_dtype():
    torch.manual_seed(1)
    norm = BiasFreeLayerNorm(8)
    x = torch.randn(1, 8, 4, 4) * 300 + 100  # squares past float16's range (65504)
    out = norm(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.float(), _plain_norm(x.half().float(), norm.weight), rtol=1e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x).dtype == torch.bfloat16
        assert norm(x.double()).dtype == torch.float64  # autocast leaves float64 alone, and so does the norm


def test_pointwise_conv_is_the_1x1_convolution():
    torch.manual_seed(2)
    pointwise = PointwiseConv2d(5, 7, bias=True).double()
    x = torch.randn(2, 5, 6, 4, dtype=torch.float64)
    expected = F.conv2d(x, pointwise.weight, pointwise.bias)
    assert torch.allclose(pointwise(x), expected, rtol=0, atol=1e-13)
    assert pointwise(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("window, padding", [(4, 1), (2, 1), (4, 2), (4, 4), (4, 0), (2, 3)])
def test_overlapping_windows_are_unfolds_windows(window, padding):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 4 * window, 3 * window, dtype=torch.float64)
    key = window + 2 * padding
    unfolded = F.unfold(x, key, stride=window, padding=padding)  # zeros beyond the image, as in the network
    expected = rearrange(unfolded, "b (c ky kx) (nh nw) -> b nh ky nw kx c", c=5, ky=key, kx=key, nh=4)
    assert torch.equal(overlapping_windows(x.permute(0, 2, 3, 1), window, padding), expected)


def _normalised_channel_attention(attention: ParityChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """The split-layout G-CSA as first written (NCHW): q and k normalised over each block's
    positions, then multiplied."""
    q, k, v = attention.qkv_depthwise(F.conv2d(x, attention.qkv.weight), True).chunk(3, dim=1)
    block = attention.block // 2 or x.shape[-1]
    sizes = {"head": attention.heads, "h": attention.block // 2 or x.shape[-2], "w": block}
    q, k, v = (rearrange(t, "b (head c) (nh h) (nw w) -> b nh nw head c (h w)", **sizes) for t in (q, k, v))
    weights = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * attention.temperature
    out = rearrange(weights.softmax(dim=-1) @ v, "b nh nw head c (h w) -> b (head c) (nh h) (nw w)",
                    h=sizes["h"], w=sizes["w"])
    return F.conv2d(out, attention.project.weight)


@pytest.mark.parametrize("block", [0, 8])
def test_channel_attention_matches_normalising_q_and_k(block):
    torch.manual_seed(4)
    attention = ParityChannelAttention(8, heads=2, block=block).double()
    with torch.no_grad():
        attention.temperature.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 8, 12, dtype=torch.float64)
    assert torch.allclose(attention(x, True), _normalised_channel_attention(attention, x), rtol=0, atol=1e-12)


def test_channel_attention_in_float16_does_not_overflow():
    """Raw products over a block's positions pass float16's range where normalised ones did not."""
    torch.manual_seed(5)
    attention = ParityChannelAttention(8, heads=1)
    x = torch.randn(1, 8, 64, 64) * 100
    half = ParityChannelAttention(8, heads=1).half()
    half.load_state_dict(attention.state_dict())
    with torch.no_grad():
        reference, out = attention(x, True), half(x.half(), True)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


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
