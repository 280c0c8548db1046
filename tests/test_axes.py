import numpy as np
import pytest

from napari_tbsn.axes import PlaneLayout, guess_axes, parse_axes


@pytest.mark.parametrize(
    "axes, ndim, message",
    [("ZYQ", 3, "unknown letters"), ("YYX", 3, "repeats"), ("ZY", 2, "both Y and X"), ("ZYX", 2, "dimensions")],
)
def test_bad_axes_are_explained(axes, ndim, message):
    with pytest.raises(ValueError, match=message):
        parse_axes(axes, ndim)


def test_axes_are_case_insensitive():
    assert parse_axes("tzyx", 4) == "TZYX"


@pytest.mark.parametrize("shape, rgb, expected", [((5, 5), False, "YX"), ((3, 5, 5), False, "ZYX"),
                                                   ((2, 3, 5, 5), False, "TZYX"), ((5, 5, 3), True, "YXC")])
def test_guess_axes(shape, rgb, expected):
    assert guess_axes(shape, rgb) == expected


def test_planes_round_trip_with_channels_anywhere():
    data = np.arange(2 * 3 * 4 * 5 * 6, dtype=np.uint16).reshape(2, 4, 5, 3, 6)  # T Z Y C X
    layout = PlaneLayout.of(data.shape, "TZYCX")
    assert (layout.channels, layout.height, layout.width, layout.plane_count) == (3, 5, 6, 8)
    out = np.zeros(data.shape, dtype=np.float32)
    for plane in layout.plane_indices():
        block = layout.read_plane(data, plane)
        assert block.shape == (3, 5, 6) and block.dtype == np.float32
        np.testing.assert_array_equal(block[1], data[plane[0], plane[1], :, 1, :])
        layout.write_plane(out, plane, block)
    np.testing.assert_array_equal(out, data)
