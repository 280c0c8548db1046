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


def _recomputed(net: TBSN) -> TBSN:
    """`net` with each transformer block's activations recomputed in the backward pass instead
    of kept (torch.utils.checkpoint): the same functions, in float64 on the CPU the same
    gradients bit for bit, at a fraction of the memory (the paper preset's float64 graph at
    128x128 held over 6 GB)."""
    from torch.utils.checkpoint import checkpoint

    from napari_tbsn.network.tbsn import TransformerBlock

    for module in net.modules():
        if isinstance(module, TransformerBlock):
            module.forward = (lambda x, split=True, forward=module.forward:
                              checkpoint(forward, x, split, use_reentrant=False))
    return net


def _sizes_for(preset: str):
    if NETWORK_PRESETS[preset].size_multiple > 64:
        pytest.skip("sizes below the preset's size multiple")
    return SIZES


@pytest.mark.parametrize("preset", sorted(NETWORK_PRESETS))
def test_exactly_blind_to_the_same_parity_lattice(preset):
    net = _recomputed(_network(preset))
    generator = torch.Generator().manual_seed(1)
    for index, (height, width) in enumerate(_sizes_for(preset)):
        # Two batch items at the first size show that no gradient crosses between them; one item
        # at the larger sizes halves their float64 graph (paper at 128x128: gigabytes).
        x = torch.randn(2 if index == 0 else 1, 2, height, width, dtype=torch.float64, generator=generator,
                        requires_grad=True)
        out = net(x)
        for py in range(2):
            for px in range(2):
                cls = _parity_mask(height, width, py, px)
                weights = torch.rand(out.shape[1:], dtype=torch.float64, generator=generator) + 0.5
                # Outputs of batch item 0, parity class c, all channels.
                selected = (out[0] * weights * cls).sum()
                (grad,) = torch.autograd.grad(selected, x, retain_graph=True)
                assert torch.count_nonzero(grad[0][:, cls]) == 0, (preset, height, width, py, px)
                if len(grad) > 1:
                    assert torch.count_nonzero(grad[1]) == 0, "gradient crossed between batch items"
                # The other three classes are seen.
                assert torch.count_nonzero(grad[0][:, ~cls]) > 0.9 * grad[0][:, ~cls].numel()
        del out, selected, grad  # this size's graph goes before the next is built (paper: gigabytes)


@pytest.mark.parametrize("preset", sorted(NETWORK_PRESETS))
def test_single_pixels_see_their_neighbours_but_not_themselves(preset):
    net = _recomputed(_network(preset))
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


# -- through Denoiser.predict: tile seams -------------------------------------------------
# The tiler cuts the padded plane into tiles and blends them. A tile's edge inside the image
# (a seam) is an edge for everything computed per tile, the lattice filter's padding included.
# The probes are the pixels at offsets 0 to 7 inside a tile from an internal edge, on both sides
# of a seam; each is perturbed alone, and its own output must not move.
SEAM_OFFSETS = range(8)
PERTURBATION = 40.0  # photons: twice the synthetic image's peak


def _seam_model():
    """A tiny model with random weights, a fitted-looking variance head, a noise model and a
    lattice filter with clearly non-zero coefficients: every path a teacher prediction takes."""
    from napari_tbsn.config import network_preset
    from napari_tbsn.lattice import LatticeFilter
    from napari_tbsn.model import FittedModel
    from napari_tbsn.noise import NoiseModel
    from napari_tbsn.normalization import Normalizer

    torch.manual_seed(0)
    network = TBSN(network_preset("tiny", 1, variance_head=True)).eval()
    with torch.no_grad():
        for param in network.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    lattice = LatticeFilter(((0.3, 0.15, 0.15, 0.05, 0.05, 0.2, -0.1, 0.1, -0.05, 0.05),), prior_scale=(0.8,))
    return FittedModel(network, Normalizer((0.0,), (20.0,)), pd=1, preset="tiny",
                       noise_model=NoiseModel.from_camera(1.0, 3.0), lattice_filter=lattice)


def _seam_pixels(predictor, length: int) -> list[tuple[int, int]]:
    """(image coordinate, offset from the tile edge) of the pixels at offsets 0-7 inside a tile
    from the internal edges of the last seam along a side of `length` pixels: the end of the
    last tile but one and the start of the last tile. Empty where one tile covers the side."""
    from napari_tbsn.tiling import tile_starts

    before, after = predictor.padding(length)
    tile = predictor.tile_length(before + length + after)
    starts = tile_starts(before + length + after, tile, predictor.tile_overlap, predictor.size_multiple)
    if len(starts) < 2:
        return []
    end, start = starts[-2] + tile - before, starts[-1] - before
    pixels = [(end - 1 - offset, offset) for offset in SEAM_OFFSETS]
    pixels += [(start + offset, offset) for offset in SEAM_OFFSETS]
    assert all(0 <= pixel < length for pixel, _ in pixels), "the seam must lie inside the image"
    return pixels


# (image shape, tile_size, tile_overlap, lattice, estimator). Tiles start on the network's
# 64-pixel grid, so every overlap from 1 to 64 runs as 64 (tile_size 64 then grows to 128):
# the overlaps that actually occur are 0 and multiples of 64.
SEAM_CASES = [
    ((128, 128), 64, 0, True, "blind_spot"),
    ((128, 128), 64, 0, True, "posterior"),
    ((128, 128), 64, 0, False, "blind_spot"),
    ((64, 192), 64, 1, True, "blind_spot"),  # tiles of 128 overlapping by 64, across x
    ((192, 64), 128, 0, True, "posterior"),  # tiles of 128 abutting, down y
]


@pytest.mark.parametrize("shape, tile_size, tile_overlap, lattice, estimator", SEAM_CASES)
def test_pixels_next_to_tile_seams_never_see_themselves(shape, tile_size, tile_overlap, lattice, estimator, device):
    """Blind at every offset 0-7 from a seam. The posterior folds y_p back in on purpose: there
    its standard deviation, a function of the (refined) blind-spot mean and prior alone, must
    not move, and the estimate must move towards the perturbation by less than all of it."""
    import numpy as np

    from napari_tbsn import Denoiser, PredictOptions
    from napari_tbsn.prediction import make_runner

    from .conftest import noisy_image

    options = PredictOptions(estimator=estimator, ensemble=1, lattice=lattice, tile_size=tile_size,
                             tile_overlap=tile_overlap, batch_size=16)
    model = _seam_model()
    denoiser = Denoiser.from_model(model, options, device=device)
    predictor = make_runner(model, options, torch.device("cpu"), 1).tiled(tile_size)
    rows, columns = _seam_pixels(predictor, shape[0]), _seam_pixels(predictor, shape[1])
    assert rows or columns, "no seam to probe"
    # Both sides tiled: each probe sits next to a seam in y and in x. One side tiled: the
    # probes cross its seam in the middle of the other side.
    rows = rows or [(shape[0] // 2, None)] * len(columns)
    columns = columns or [(shape[1] // 2, None)] * len(rows)
    probes = list(zip(rows, columns))
    _, image = noisy_image(shape, seed=4)

    def predict(data):
        if estimator != "posterior":
            return denoiser.predict(data, "YX"), None
        spread = np.zeros_like(data)
        return denoiser.predict(data, "YX", uncertainty=spread), spread

    before, before_spread = predict(image)
    leaks = []
    for (y, offset_y), (x, offset_x) in probes:
        changed = image.copy()
        changed[y, x] += PERTURBATION
        after, after_spread = predict(changed)
        assert np.abs(after - before).max() > 1e-3, "the perturbation must be seen around it"
        # Exactly on the CPU; a GPU's convolutions (Winograd, TF32, bfloat16) round each output
        # with its whole input tile, so there a leak is a change above rounding.
        rounding = 0.0 if device == "cpu" else 1e-3 * float(np.abs(after - before).max())
        if estimator == "posterior":
            moved = (after[y, x] - before[y, x]) / PERTURBATION
            if abs(after_spread[y, x] - before_spread[y, x]) > rounding or not 0 < moved < 1:
                leaks.append(((y, x), (offset_y, offset_x), float(after_spread[y, x] - before_spread[y, x])))
        elif abs(after[y, x] - before[y, x]) > rounding:
            leaks.append(((y, x), (offset_y, offset_x), float(after[y, x] - before[y, x])))
    assert not leaks, f"pixel, offsets from the seam, change of its own output: {leaks}"
