import numpy as np
import pytest

from napari_tbsn.tiling import blend_ramp, tile_starts

from .conftest import noisy_image


@pytest.mark.parametrize("length, tile, overlap", [(100, 32, 8), (256, 256, 48), (300, 256, 48), (1000, 96, 32)])
def test_tiles_cover_everything_with_enough_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap


def test_blend_weights_are_positive_and_flat_at_image_edges():
    ramp = blend_ramp(64, 16, at_start=True, at_end=False)
    assert ramp[0] == 1 and ramp.min() > 0 and ramp[-1] < 0.01


def test_tiled_prediction_has_no_seams(fitted_tiny):
    _, noisy = noisy_image((160, 224), seed=3)
    fitted_tiny.tile_size, fitted_tiny.tile_overlap = 1024, 0
    whole = fitted_tiny.predict(noisy, "YX")
    fitted_tiny.tile_size, fitted_tiny.tile_overlap = 64, 32
    tiled = fitted_tiny.predict(noisy, "YX")
    fitted_tiny.tile_size, fitted_tiny.tile_overlap = 256, 48
    data_range = float(whole.max() - whole.min())
    assert np.abs(tiled - whole).max() <= 1e-3 * data_range


def test_every_size_down_to_the_minimum(fitted_tiny):
    minimum = fitted_tiny.minimum_size()
    for shape in [(minimum, minimum), (minimum + 3, 2 * minimum + 5), (37, 300)]:
        _, noisy = noisy_image(shape)
        out = fitted_tiny.predict(noisy, "YX")
        assert out.shape == noisy.shape and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="at least"):
        fitted_tiny.predict(np.zeros((minimum - 1, 64), np.float32), "YX")
