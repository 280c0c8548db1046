import numpy as np
import pytest

from napari_tbsn.tiling import blend_ramp, tile_starts

from .conftest import noisy_image


@pytest.mark.parametrize("length, tile, overlap", [(256, 128, 64), (256, 256, 48), (320, 256, 96), (1024, 192, 64)])
def test_tiles_cover_everything_on_the_grid_with_enough_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap, align=64)
    assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
    assert all(start % 64 == 0 for start in starts)
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap


def test_blend_weights_ignore_tile_edges_and_stay_flat_at_image_edges():
    ramp = blend_ramp(96, 0, 48)
    assert ramp[0] == 1 and np.all(ramp[:48] == 1) and np.all(ramp[-18:] == 0) and ramp[-31] > 0.99
    assert np.all(np.diff(ramp[-48:]) <= 0)
    # Two neighbours overlapping by 48 always leave some weight on every pixel.
    left, right = blend_ramp(96, 0, 48), blend_ramp(96, 48, 0)
    assert np.all(left[48:] + right[:48] > 0.5)


def test_tiled_prediction_has_no_seams(fitted_tiny):
    _, noisy = noisy_image((250, 430), seed=3)
    fitted_tiny.tile_size, fitted_tiny.tile_overlap = 1024, 0
    whole = fitted_tiny.predict(noisy, "YX")
    fitted_tiny.tile_size, fitted_tiny.tile_overlap = 384, 256  # two tiles across
    tiled = fitted_tiny.predict(noisy, "YX")
    fitted_tiny.tile_size, fitted_tiny.tile_overlap = 768, 256
    data_range = float(whole.max() - whole.min())
    assert np.abs(tiled - whole).max() <= 1e-3 * data_range


def test_every_size_down_to_the_minimum(fitted_tiny):
    minimum = fitted_tiny.minimum_size()
    for shape in [(minimum, minimum), (minimum + 3, 2 * minimum + 5), (minimum, 300)]:
        _, noisy = noisy_image(shape)
        out = fitted_tiny.predict(noisy, "YX")
        assert out.shape == noisy.shape and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="at least"):
        fitted_tiny.predict(np.zeros((minimum - 1, 64), np.float32), "YX")
