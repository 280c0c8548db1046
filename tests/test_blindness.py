"""The blind spot is exact: output p never depends on an input pixel at p + 2Z^2.

Checked in float64 with random weights by backpropagation. One backward per parity class
covers every output position of that class at once: the outputs of class c are summed with
random weights, so the gradient reaching class-c inputs is a sum of terms that must each be
exactly zero (a non-zero term surviving cancellation by chance has probability zero).
"""

from __future__ import annotations

import pytest
import torch

from napari_tbsn import TBSN
from napari_tbsn.config import NETWORK_PRESETS

SIZES = [(64, 64), (128, 128), (64, 128)]


def _parity_mask(height: int, width: int, py: int, px: int) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[py::2, px::2] = True
    return mask


def _network(preset: str, channels: int = 2) -> TBSN:
    torch.manual_seed(0)
    net = TBSN.from_preset(preset, channels=channels).double().eval()
    # Random, non-trivial weights everywhere (the centre tap of the input conv included).
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return net


def _sizes_for(preset: str):
    if NETWORK_PRESETS[preset].size_multiple > 64:
        pytest.skip("sizes below the preset's size multiple")
    return SIZES


@pytest.mark.parametrize("preset", sorted(NETWORK_PRESETS))
def test_exactly_blind_to_the_same_parity_lattice(preset):
    net = _network(preset)
    generator = torch.Generator().manual_seed(1)
    for height, width in _sizes_for(preset):
        x = torch.randn(2, 2, height, width, dtype=torch.float64, generator=generator, requires_grad=True)
        out = net(x)
        for py in range(2):
            for px in range(2):
                cls = _parity_mask(height, width, py, px)
                weights = torch.rand(out.shape[1:], dtype=torch.float64, generator=generator) + 0.5
                # Outputs of batch item 0, parity class c, all channels.
                selected = (out[0] * weights * cls).sum()
                (grad,) = torch.autograd.grad(selected, x, retain_graph=True)
                assert torch.count_nonzero(grad[0][:, cls]) == 0, (preset, height, width, py, px)
                assert torch.count_nonzero(grad[1]) == 0, "gradient crossed between batch items"
                # The other three classes are seen.
                assert torch.count_nonzero(grad[0][:, ~cls]) > 0.9 * grad[0][:, ~cls].numel()


@pytest.mark.parametrize("preset", sorted(NETWORK_PRESETS))
def test_single_pixels_see_their_neighbours_but_not_themselves(preset):
    net = _network(preset)
    height, width = 64, 128
    x = torch.randn(2, 2, height, width, dtype=torch.float64, requires_grad=True)
    out = net(x)
    window = net.config.window
    # Interior, corners, borders, window edges, low-resolution cell edges, channel-block edges.
    positions = [(31, 40), (0, 0), (height - 1, width - 1), (0, 37), (window - 1, window), (4 * window - 1, 3),
                 (32, 63), (33, 64)]
    for y, x_pos in positions:
        (grad,) = torch.autograd.grad(out[1, :, y, x_pos].sum(), x, retain_graph=True)
        assert torch.count_nonzero(grad[0]) == 0
        lattice = grad[1][:, y % 2 :: 2, x_pos % 2 :: 2]
        assert torch.count_nonzero(lattice) == 0, (preset, y, x_pos)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x_pos + dx
                if (dy, dx) == (0, 0) or not (0 <= ny < height and 0 <= nx < width):
                    continue
                assert torch.all(grad[1][:, ny, nx] != 0), (preset, y, x_pos, dy, dx)


def test_centre_tap_cannot_be_switched_back_on():
    net = _network("tiny", channels=1)
    with torch.no_grad():
        net.input_conv.weight[..., 1, 1] = 100.0
    state = net.state_dict()
    reloaded = TBSN(net.config).double()
    reloaded.load_state_dict(state)
    x = torch.randn(1, 1, 64, 64, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(reloaded(x)[0, 0, 10, 10], x)
    assert grad[0, 0, 10, 10] == 0
    assert "centre_mask" not in state


@pytest.mark.parametrize("overlap", [0.25, 0.75, 0.3])
def test_overlaps_that_break_the_dilation_mask_are_rejected(overlap):
    from napari_tbsn.config import NetworkConfig

    with pytest.raises(ValueError, match="overlap"):
        NetworkConfig(window=8, overlap=overlap)


def test_paper_preset_has_the_paper_size():
    net = TBSN.from_preset("paper")
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert abs(trainable - 12.7e6) < 0.2e6
    assert net.size_multiple == 64


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_split_layout_equals_the_papers_full_resolution_formulation(preset):
    net = _network(preset)
    x = torch.randn(2, 2, 64, 128, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x, layout="split"), net(x, layout="full"), rtol=1e-10, atol=1e-10)


def test_variance_head_and_context_planes_keep_the_centre_plane_blind():
    """Neighbouring planes (context channels) are seen whole, the variance head too is blind,
    and the blind plane's own lattice stays exactly invisible to every output channel."""
    from napari_tbsn.config import network_preset

    torch.manual_seed(0)
    net = TBSN(network_preset("tiny", 1, variance_head=True, context_channels=2)).double().eval()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    assert net(x).shape == (1, 2, 64, 64)  # mean and log prior variance
    # The variance head reads detached features (no gradient flows): differentiate its
    # function through the features instead.
    weight, bias = net.output_conv.weight, net.output_conv.bias
    out = torch.nn.functional.conv2d(net.features(x), weight, bias)
    torch.testing.assert_close(out, net(x))
    for y, x_pos in [(31, 40), (0, 0), (63, 17)]:
        for channel in range(2):
            (grad,) = torch.autograd.grad(out[0, channel, y, x_pos], x, retain_graph=True)
            assert torch.count_nonzero(grad[0, 0, y % 2 :: 2, x_pos % 2 :: 2]) == 0, (y, x_pos, channel)
            # The neighbouring planes are seen at the pixel itself.
            assert torch.all(grad[0, 1:, y, x_pos] != 0), (y, x_pos, channel)
