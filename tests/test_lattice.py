"""The lattice refinement reads the noisy pixels the dilated blind spot skips, and still never
the pixel it corrects (float64 gradients); its least-squares fit lowers the true error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_tbsn import TBSN, Denoiser
from napari_tbsn.config import network_preset
from napari_tbsn.lattice import (
    LatticeFilter,
    class_kernels,
    offset_classes,
    prior_scale,
    residual_weight,
)
from napari_tbsn.model_io import ModelFileError
from napari_tbsn.posterior import NoiseTerms, split_output

from .conftest import noisy_image


def test_offset_classes_are_the_even_offsets_by_length():
    classes = offset_classes(4)
    assert [len(c) for c in classes] == [4, 4, 4, 8, 4]  # (0,2) (2,2) (0,4) (2,4) (4,4)
    offsets = [o for c in classes for o in c]
    assert len(offsets) == 24 and (0, 0) not in offsets
    assert all(dy % 2 == 0 and dx % 2 == 0 for dy, dx in offsets)
    assert class_kernels(4).sum() == 24


@pytest.mark.parametrize("line", ["", "rows", "columns"])  # residuals as they are, or centred along lines
def test_refined_mean_sees_the_lattice_but_not_the_pixel_itself(line):
    torch.manual_seed(0)
    net = TBSN(network_preset("tiny", 1, variance_head=True)).double().eval()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    noise = NoiseTerms.of(np.array([0.02]), np.array([0.01]), np.array([1e-6]), torch.device("cpu"))
    noise = NoiseTerms(noise.gain.double(), noise.offset.double(), noise.floor.double())
    lattice = LatticeFilter(((0.3, 0.15, 0.15, 0.05, 0.05, 0.1, -0.02, 0.03, -0.01, 0.01),), line=line)
    x = torch.rand(1, 1, 64, 64, dtype=torch.float64, requires_grad=True)
    # Through the features, so that the (detached) variance head's gradient shows too.
    mean, prior = split_output(F.conv2d(net.features(x), net.output_conv.weight, net.output_conv.bias))
    mean, prior = mean.double(), prior.double()
    refined = lattice.apply(mean, x, residual_weight(prior, noise.variance(mean)), None)
    for y, x_pos in [(31, 40), (0, 0), (63, 17), (2, 61)]:
        (grad,) = torch.autograd.grad(refined[0, 0, y, x_pos], x, retain_graph=True)
        assert grad[0, 0, y, x_pos] == 0, (y, x_pos)
        (raw,) = torch.autograd.grad(mean[0, 0, y, x_pos], x, retain_graph=True)
        lattice_pixels = torch.zeros(64, 64, dtype=torch.bool)
        lattice_pixels[y % 2 :: 2, x_pos % 2 :: 2] = True
        lattice_pixels[y, x_pos] = False
        assert torch.count_nonzero(raw[0, 0][lattice_pixels]) == 0  # the network skips them all
        near = torch.zeros(64, 64, dtype=torch.bool)
        near[max(0, y - 4) : y + 5, max(0, x_pos - 4) : x_pos + 5] = True
        assert torch.all(grad[0, 0][lattice_pixels & near] != 0), (y, x_pos)  # the refinement reads them


def test_fit_lowers_the_true_error_of_a_correlated_mean():
    """A mean whose error is smooth (as a network's is): the fitted filter, seeing only the noisy
    data, finds the error from the lattice residuals and removes part of it."""
    generator = torch.Generator().manual_seed(0)
    clean = 5 + 4 * torch.sin(torch.arange(128.0)[:, None] / 9) * torch.cos(torch.arange(128.0)[None, :] / 7)
    clean = clean.expand(8, 1, 128, 128)
    blur = torch.ones(1, 1, 5, 5) / 25
    error = F.conv2d(torch.randn(8, 1, 132, 132, generator=generator), blur) * 2.5
    mean = clean + error
    noisy = clean + clean.sqrt() * torch.randn(clean.shape, generator=generator)
    lattice = LatticeFilter.fit(mean, noisy, 1.0)
    refined = lattice.apply(mean, noisy, 1.0, None)
    inner = (..., slice(8, -8), slice(8, -8))
    before = torch.mean((mean - clean)[inner] ** 2)
    after = torch.mean((refined - clean)[inner] ** 2)
    assert after < 0.8 * before
    assert LatticeFilter.from_dict(lattice.to_dict()) == lattice


def test_a_filter_centred_along_rows_puts_no_row_offset_back():
    """Row offsets in the noisy data: the blind-spot loss rewards a filter that reads them off
    p's row and puts them back; the centred one cannot see them, and still lowers the error."""
    generator = torch.Generator().manual_seed(0)
    clean = 5 + 4 * torch.sin(torch.arange(128.0)[:, None] / 9) * torch.cos(torch.arange(128.0)[None, :] / 7)
    clean = clean.expand(8, 1, 128, 128)
    error = F.conv2d(torch.randn(8, 1, 132, 132, generator=generator), torch.ones(1, 1, 5, 5) / 25) * 2.5
    mean = clean + error
    rows = torch.randn(8, 1, 128, 1, generator=generator) * 1.5
    noisy = clean + clean.sqrt() * torch.randn(clean.shape, generator=generator) + rows
    inner = (..., slice(8, -8), slice(8, -8))

    def true_error(lattice):
        return float(torch.mean((lattice.apply(mean, noisy, 1.0, None) - clean)[inner] ** 2))

    centred, plain = LatticeFilter.fit(mean, noisy, 1.0, line="rows"), LatticeFilter.fit(mean, noisy, 1.0)
    before = float(torch.mean((mean - clean)[inner] ** 2))
    assert true_error(centred) < 0.8 * before < true_error(plain)
    moved = noisy + torch.randn(8, 1, 128, 1, generator=generator) * 3
    assert torch.allclose(centred.apply(mean, moved, 1.0, None), centred.apply(mean, noisy, 1.0, None), atol=1e-4)
    assert LatticeFilter.from_dict(centred.to_dict()) == centred and centred.line == "rows"
    with pytest.raises(ValueError, match="line reach"):
        LatticeFilter.from_dict({**centred.to_dict(), "line_reach": 0})
    columns = LatticeFilter.fit(mean.transpose(-1, -2), noisy.transpose(-1, -2), 1.0, line="columns")
    assert np.allclose(columns.coefficients, centred.coefficients, atol=1e-6)
    assert centred.reads_blindly(("rows",)) and not centred.reads_blindly(("columns",))
    assert plain.reads_blindly(()) and not plain.reads_blindly(("rows",))


def test_denoiser_fits_saves_and_can_skip_the_filter(fitted_tiny, tmp_path, device):
    assert fitted_tiny.lattice_filter is not None and any(fitted_tiny.lattice_filter.coefficients[0])
    assert len(fitted_tiny.lattice_filter.prior_scale) == 1  # a posterior model rescales its prior
    loaded = Denoiser.load(fitted_tiny.save(tmp_path / "m.safetensors"), device=device)
    assert loaded.lattice_filter == fitted_tiny.lattice_filter
    _, noisy = noisy_image((96, 96), seed=3)
    raw = Denoiser(preset="tiny", device=device, lattice=False).fit(noisy, "YX", iterations=2)
    assert raw.lattice_filter is None and Denoiser.load(raw.save(tmp_path / "raw.safetensors")).lattice_filter is None


def test_damaged_filter_in_a_model_file_is_explained(fitted_tiny, tmp_path):
    from napari_tbsn import model_io

    path = fitted_tiny.save(tmp_path / "m.safetensors")
    state, description = model_io.load_model(path)
    description["lattice_filter"] = {"coefficients": "garbage"}
    model_io.save_model(path, state, description)
    with pytest.raises(ModelFileError, match="unreadable lattice filter"):
        Denoiser.load(path)


def test_prior_scale_finds_how_much_too_wide_the_prior_is():
    generator = torch.Generator().manual_seed(1)
    clean = torch.rand(4, 1, 96, 96, generator=generator) * 10
    error_variance, noise_variance = 0.2 + 0.05 * clean, 1.0 + clean
    mean = clean + error_variance.sqrt() * torch.randn(clean.shape, generator=generator)
    noisy = clean + noise_variance.sqrt() * torch.randn(clean.shape, generator=generator)
    (scale,) = prior_scale(mean, 3 * error_variance, noisy, noise_variance)
    assert scale == pytest.approx(1 / 3, rel=0.25)


def test_refined_mean_stays_blind_at_every_offset_from_the_tile_edge():
    """A tile's edge inside the image gets no reflected context: the filter pads there itself.
    The pixels at odd offsets from the edge are where a padding that changes parity (replicate)
    would hand p a neighbour's mean that saw y_p."""
    torch.manual_seed(0)
    net = TBSN(network_preset("tiny", 1)).double().eval()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    lattice = LatticeFilter(((0.3, 0.15, 0.15, 0.05, 0.05, 0.2, -0.1, 0.1, -0.05, 0.05),))
    x = torch.rand(1, 1, 64, 64, dtype=torch.float64, requires_grad=True)
    mean = net(x)
    refined = lattice.apply(mean, x, 1.0, None)
    for offset in range(8):
        for y, x_pos in [(offset, 63 - offset), (63 - offset, offset), (offset, 30), (33, 63 - offset)]:
            (grad,) = torch.autograd.grad(refined[0, 0, y, x_pos], x, retain_graph=True)
            assert grad[0, 0, y, x_pos] == 0, (y, x_pos)


@pytest.mark.parametrize("line", ["", "rows"])
def test_a_far_filter_reads_nothing_on_the_far_ring(line):
    """Where a single image decides its own hot pixels from the ring 4 pixels away, neither the
    value nor the usability of p + FAR_OFFSETS may move p's refined mean."""
    from napari_tbsn.lattice import FAR_OFFSETS

    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(1, 1, 40, 64, generator=generator)
    noisy = mean + torch.randn(1, 1, 40, 64, generator=generator) + torch.randn(1, 1, 40, 1, generator=generator)
    lattice = LatticeFilter.fit(mean, noisy, 1.0, line=line, far=True)
    near = LatticeFilter.fit(mean, noisy, 1.0, line=line)
    far_classes = [k for k, offsets in enumerate(offset_classes()) if set(offsets) <= FAR_OFFSETS]
    assert far_classes and all(lattice.coefficients[0][k] == 0 for k in far_classes)
    assert all(near.coefficients[0][k] != 0 for k in far_classes)
    y, x = 20, 30
    before = lattice.apply(mean, noisy, 1.0, None)
    for dy, dx in sorted(FAR_OFFSETS) + [(0, 2), (2, 0)]:
        moved = noisy.clone()
        moved[0, 0, y + dy, x + dx] += 5.0
        unusable = torch.zeros_like(mean)
        unusable[0, 0, y + dy, x + dx] = 1.0
        value = lattice.apply(mean, moved, 1.0, None)[0, 0, y, x]
        # The prediction weighs an unusable residual 0 (and, centred, leaves it out of the means).
        usable = lattice.apply(mean, noisy, 1 - unusable, None, unusable)[0, 0, y, x]
        if (dy, dx) in FAR_OFFSETS:
            assert value == before[0, 0, y, x] and usable == before[0, 0, y, x], (dy, dx)
        else:
            assert value != before[0, 0, y, x] and usable != before[0, 0, y, x], (dy, dx)
    assert LatticeFilter.from_dict(lattice.to_dict()) == lattice
