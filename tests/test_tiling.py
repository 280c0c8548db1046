import numpy as np
import pytest
import torch

from napari_tbsn.progress import drive
from napari_tbsn.tiling import blend_ramp, tile_starts

from .conftest import agreement, noisy_image


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
    whole = fitted_tiny.predict(noisy, "YX", tile_size=1024, tile_overlap=0)
    tiled = fitted_tiny.predict(noisy, "YX", tile_size=384, tile_overlap=256)  # two tiles across
    data_range = float(whole.max() - whole.min())
    assert np.abs(tiled - whole).max() <= agreement(fitted_tiny.device, whole, 1e-3 * data_range)


def test_every_size_down_to_the_minimum(fitted_tiny):
    minimum = fitted_tiny.minimum_size()
    for shape in [(minimum, minimum), (minimum + 3, 2 * minimum + 5), (minimum, 300)]:
        _, noisy = noisy_image(shape)
        out = fitted_tiny.predict(noisy, "YX")
        assert out.shape == noisy.shape and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="at least"):
        fitted_tiny.predict(np.zeros((minimum - 1, 64), np.float32), "YX")


@pytest.mark.parametrize("pd", [1, 2])
def test_border_padding_never_shows_a_pixel_to_itself(fitted_tiny, pd, device):
    # Predict pads each side with reflected pixels. A copy of pixel p must stay on p's blind
    # lattice (p + 2 * pd * Z^2 once pixel-shuffled by pd), or the blind-spot output at the
    # border would see the noise it must not see.
    import dataclasses

    from napari_tbsn import Denoiser, PredictOptions

    _, noisy = noisy_image((140, 130), seed=5)
    denoiser = Denoiser.from_model(dataclasses.replace(fitted_tiny.model, pd=pd),
                                   PredictOptions(refine=0, estimator="blind_spot", ensemble=8), device=device)
    before = denoiser.predict(noisy, "YX")
    for y, x in [(0, 0), (1, 1), (0, 129), (139, 0), (138, 127), (1, 50), (50, 1), (50, 50)]:
        changed = noisy.copy()
        changed[y, x] += 100.0
        after = denoiser.predict(changed, "YX")
        seen = float(np.abs(after - before).max())
        assert seen > 0.01  # the change is seen around it (a 30-iteration fit responds weakly; rounding is ~1e-6)
        # Exactly on the CPU; on a GPU a change above rounding (test_blindness.py says why).
        assert abs(after[y, x] - before[y, x]) <= (0.0 if device == "cpu" else 1e-3 * seen), (y, x)


def test_border_pixels_get_reflected_context():
    from napari_tbsn.tiling import reflect_indices

    assert np.array_equal(reflect_indices(10, 4, 5), np.pad(np.arange(10), (4, 5), mode="reflect"))
    for period in (2, 3):
        index = reflect_indices(11, 2 * period + 1, 3 * period, period)
        position = np.arange(-2 * period - 1, 11 + 3 * period)
        assert np.all((index - position) % (2 * period) == 0)  # on the pixel's own blind lattice
        assert index.min() >= 0 and index.max() <= 10


def test_a_plane_that_fits_the_tile_runs_as_one_tile_despite_its_border_padding():
    import torch

    from napari_tbsn.tiling import TiledPredictor

    shapes = []

    def model(batch, inside):
        shapes.extend([tuple(batch.shape[-2:])] * len(batch))
        return batch

    predictor = TiledPredictor(model, 16, 128, 32, batch_size=4, device=torch.device("cpu"))
    plane = np.random.default_rng(0).random((1, 128, 100), dtype=np.float32)
    assert np.array_equal(predictor.predict(plane), plane)
    assert shapes == [(144, 128)]  # 128 and 100 + reflected borders to the 16-pixel grid: one pass
    shapes.clear()
    assert np.allclose(predictor.predict(np.tile(plane, (1, 2, 1))), np.tile(plane, (1, 2, 1)))
    assert len(shapes) > 1 and all(shape == (128, 128) for shape in shapes)  # larger: tile_size tiles


class RecordingPlane:
    """A (C, H, W) plane that records the blocks read from it."""

    def __init__(self, plane: np.ndarray) -> None:
        self.plane, self.shape, self.reads = plane, plane.shape, []

    def __getitem__(self, key):
        self.reads.append(key[1:])
        return self.plane[key]


@pytest.mark.parametrize("period", [1, 2])
def test_a_region_of_a_tiled_plane_equals_that_region_of_the_whole_and_reads_only_what_it_needs(period):
    import torch

    from napari_tbsn.tiling import TiledPredictor

    torch.manual_seed(0)
    convolution = torch.nn.Conv2d(2, 3, 5, padding=2)

    def model(batch, inside=None):  # its output depends on the tile: blending matters
        return convolution(batch) + batch.mean(dim=(-2, -1), keepdim=True)[:, :1]

    plane = np.random.default_rng(0).normal(size=(2, 300, 420)).astype(np.float32)
    tiler = TiledPredictor(model, 16, 128, 64, 3, torch.device("cpu"), period)
    whole = tiler.predict(plane)
    for rows, columns in ((slice(0, 300), slice(0, 420)), (slice(100, 160), slice(200, 420)), (slice(0, 16), slice(5, 9))):
        recorded = RecordingPlane(plane)
        part = drive(tiler.predict_iter(recorded, (rows, columns)))
        np.testing.assert_allclose(part, whole[:, rows, columns], atol=1e-5)
        (read_rows, read_columns), = recorded.reads
        if (rows, columns) != (slice(0, 300), slice(0, 420)):
            assert read_rows.stop - read_rows.start < 300 or read_columns.stop - read_columns.start < 420


def test_a_region_of_a_student_pass_equals_that_region_of_the_whole():
    import torch

    from napari_tbsn.network.unet import StudentConfig, UNet
    from napari_tbsn.tiling import MarginTiledPredictor

    torch.manual_seed(0)
    network = UNet(StudentConfig(8, 2, 2, 2, 1)).eval()
    plane = np.random.default_rng(1).normal(size=(2, 300, 420)).astype(np.float32)
    tiler = MarginTiledPredictor(network.core, network.padding, network.size_multiple, network.config.margin, 64,
                                 torch.device("cpu"))
    whole = drive(tiler.predict_iter(plane))
    recorded = RecordingPlane(plane)
    part = drive(tiler.predict_iter(recorded, (slice(150, 170), slice(0, 30))))
    np.testing.assert_allclose(part, whole[:, 150:170, 0:30], atol=1e-5)
    (read_rows, read_columns), = recorded.reads
    assert read_rows.stop - read_rows.start <= tiler.step + 2 * network.config.margin < 300



def test_a_plane_stays_on_the_gpu_between_tiles_unless_it_would_crowd_them(monkeypatch):
    from napari_tbsn import tiling

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(tiling, "free_memory", lambda device: 8 * 2**30)  # a GPU with 8 GiB free
    assert tiling.plane_holder(cuda, 1 * 2**30) == cuda
    assert tiling.plane_holder(cuda, 3 * 2**30) == cpu  # more than the tiles' share: on the host
    assert tiling.plane_holder(cpu, 100 * 2**30) == cpu
