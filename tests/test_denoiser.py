import re
import warnings

import numpy as np
import pytest
import torch

from napari_tbsn import Denoiser

from .conftest import noisy_image


def test_fit_and_predict_keep_shape_units_and_the_input(fitted_tiny):
    clean, noisy = noisy_image((2, 96, 128), seed=1)
    original = noisy.copy()
    out = fitted_tiny.predict(noisy, "ZYX")
    assert out.shape == noisy.shape and out.dtype == np.float32
    np.testing.assert_array_equal(noisy, original)
    # Photon units in, photon units out, and closer to the truth than the input.
    assert np.mean((out - clean) ** 2) < 0.75 * np.mean((noisy - clean) ** 2)


def test_fit_with_channels_and_time(device):
    _, noisy = noisy_image((2, 2, 64, 64), seed=2)  # T C Y X
    denoiser = Denoiser(preset="tiny", device=device).fit(noisy, "TCYX", iterations=3)
    assert denoiser.network.config.in_channels == 2
    assert denoiser.predict(noisy, "TCYX").shape == noisy.shape
    with pytest.raises(ValueError, match="channel"):
        denoiser.predict(noisy[:, 0], "TYX")


def test_fitting_is_deterministic_on_cpu():
    _, noisy = noisy_image((64, 64))
    first = Denoiser(preset="tiny", device="cpu", seed=5).fit(noisy, "YX", iterations=4)
    second = Denoiser(preset="tiny", device="cpu", seed=5).fit(noisy, "YX", iterations=4)
    for a, b in zip(first.network.state_dict().values(), second.network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cancel_stops_within_one_iteration_and_keeps_the_best_weights(device):
    _, noisy = noisy_image((128, 128))
    denoiser = Denoiser(preset="tiny", device=device)
    seen = []

    def stop_at_seven(progress):
        seen.append(progress)
        if progress.iteration == 7:
            denoiser.cancel()

    denoiser.fit(noisy, "YX", iterations=1000, callback=stop_at_seven)
    assert denoiser.summary.iterations == 7 and denoiser.summary.stopped_early
    assert [p.iteration for p in seen] == list(range(1, 8))
    assert denoiser.summary.best_validation_loss is not None
    assert denoiser.is_fitted


def test_time_budget_stops_the_fit(device):
    _, noisy = noisy_image((64, 64))
    denoiser = Denoiser(preset="tiny", device=device).fit(noisy, "YX", time_budget=1.0)
    assert denoiser.summary.iterations >= 1 and denoiser.summary.seconds < 10


@pytest.mark.parametrize(
    "data, axes, error, message",
    [
        (np.zeros((64, 64), np.complex64), "YX", TypeError, "dtype"),
        (np.zeros((64, 64), bool), "YX", TypeError, "dtype"),
        (np.full((64, 64), np.nan, np.float32), "YX", ValueError, "NaN"),
        (np.zeros((3, 64, 64), np.float32), "YX", ValueError, "dimensions"),
        (np.zeros((8, 8), np.float32), "YX", ValueError, "at least"),
    ],
)
def test_bad_input_is_explained(data, axes, error, message):
    with pytest.raises(error, match=message):
        Denoiser(preset="tiny", device="cpu").fit(data, axes, iterations=1)


def test_predict_before_fit_is_explained():
    with pytest.raises(RuntimeError, match="fit"):
        Denoiser(preset="tiny").predict(np.zeros((64, 64), np.float32), "YX")


def test_lazy_inputs_and_out_arrays(fitted_tiny, tmp_path):
    dask_array = pytest.importorskip("dask.array")
    _, noisy = noisy_image((3, 64, 96), seed=4)
    expected = fitted_tiny.predict(noisy, "ZYX")
    lazy = dask_array.from_array(noisy, chunks=(1, 64, 96))
    np.testing.assert_allclose(fitted_tiny.predict(lazy, "ZYX"), expected, atol=1e-5)
    memmap = np.lib.format.open_memmap(tmp_path / "in.npy", mode="w+", dtype=np.float32, shape=noisy.shape)
    memmap[:] = noisy
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=noisy.shape)
    assert fitted_tiny.predict(memmap, "ZYX", out=out) is out
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)


def test_unknown_preset_and_bad_pd_are_rejected():
    with pytest.raises(ValueError, match="preset"):
        Denoiser(preset="huge")
    with pytest.raises(ValueError, match="pd"):
        Denoiser(pd=0)


def test_pixel_shuffle_fit_and_predict(device):
    _, noisy = noisy_image((128, 128))
    denoiser = Denoiser(preset="tiny", pd=2, device=device).fit(noisy, "YX", iterations=2)
    assert denoiser.predict(noisy, "YX").shape == noisy.shape


def test_cancel_stops_a_prediction_and_keeps_finished_planes(fitted_tiny):
    from napari_tbsn import PredictionCancelled

    _, noisy = noisy_image((3, 64, 64), seed=6)
    out = np.full(noisy.shape, -1.0, np.float32)

    def stop_in_second_plane(progress):
        assert 0 < progress.fraction <= 1 and progress.eta is not None
        if progress.plane == 1:
            fitted_tiny.cancel()

    with pytest.raises(PredictionCancelled):
        fitted_tiny.predict(noisy, "ZYX", out=out, callback=stop_in_second_plane)
    assert np.all(out[0] != -1) and np.all(out[2] == -1)
    assert fitted_tiny.predict(noisy[:1], "ZYX").shape == (1, 64, 64)  # usable again


def test_flip_rotation_ensemble_undoes_each_of_eight_views(fitted_tiny, monkeypatch):
    _, noisy = noisy_image((64, 128), seed=8)
    views = []

    def pointwise(batch):  # commutes with flips and rotations, so every view must map back
        views.append(tuple(batch.shape))
        return batch * 2 + 1, None

    from napari_tbsn.prediction import TileModel

    monkeypatch.setattr(TileModel, "view_output", lambda self, batch: pointwise(batch))
    averaged = fitted_tiny.predict(noisy, "YX", ensemble=8, estimator="blind_spot", lattice=False)
    # Each view sees the plane with its reflected border (to 128x192 pixels), turned or not.
    assert len(views) == 8 and {(1, 1, 128, 192), (1, 1, 192, 128)} == set(views)
    expected = fitted_tiny.normalizer.denormalize(fitted_tiny.normalizer.normalize(noisy[None]) * 2 + 1)[0]
    np.testing.assert_allclose(averaged, expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="ensemble"):
        Denoiser(ensemble=4)


def test_options_for_one_call_leave_the_defaults_alone(fitted_tiny, monkeypatch):
    from napari_tbsn.prediction import TileModel

    _, noisy = noisy_image((64, 128), seed=9)
    views = []
    monkeypatch.setattr(TileModel, "view_output", lambda self, batch: views.append(1) or (batch, None))
    denoiser = Denoiser.from_model(fitted_tiny.model, fitted_tiny.options.replace(ensemble=8))
    denoiser.predict(noisy, "YX", ensemble=1, estimator="blind_spot")  # e.g. the widget's quick preview
    assert len(views) == 1 and denoiser.ensemble == 8 and denoiser.estimator == "posterior"
    assert denoiser.describe()["tiling"]["ensemble"] == 8  # a saved model keeps its setting
    assert denoiser.describe()["estimator"] == "posterior"
    with pytest.raises(AttributeError):
        denoiser.estimator = "blind_spot"  # options are per call, never assigned
    with pytest.raises(ValueError, match="ensemble"):
        fitted_tiny.predict(noisy, "YX", ensemble=4)


def test_a_given_noise_model_is_used_for_every_channel(device):
    from napari_tbsn import NoiseModel

    _, noisy = noisy_image((2, 2, 64, 64), seed=2)  # T C Y X
    camera = NoiseModel.from_camera(gain=1.0, read_noise=1.0)
    denoiser = Denoiser(preset="tiny", device=device, noise_model=camera).fit(noisy, "TCYX", iterations=2)
    assert denoiser.noise_model == camera.for_channels(2)
    assert "(given)" in denoiser.describe_noise()
    estimated = Denoiser(preset="tiny", device=device).fit(noisy, "TCYX", iterations=2).noise_model
    assert not estimated.given and estimated.offset != camera.offset[:1] * 2
    with pytest.raises(TypeError, match="NoiseModel.from_camera"):
        Denoiser(noise_model=(1.0, 1.0))


def test_a_camera_model_in_the_wrong_units_is_flagged_against_the_measured_noise(tmp_path):
    from napari_tbsn import NoiseModel

    _, noisy = noisy_image((64, 64), seed=4)  # photons: variance = signal + 1
    matching = Denoiser(preset="tiny", device="cpu", noise_model=NoiseModel.from_camera(1.0, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matching.fit(noisy, "YX", iterations=2)
    said = re.search(r"the noise measured on the data is ([\d.]+)x that", matching.describe_noise())
    assert said and 0.8 < float(said.group(1)) < 1.25
    electrons = NoiseModel.from_camera(gain=10.0, read_noise=3.0)  # ~10x the true variance
    with pytest.warns(UserWarning, match=r"noise measured on the data is 0\.\d+x the variance of the given camera"):
        flagged = Denoiser(preset="tiny", device="cpu", noise_model=electrons).fit(noisy, "YX", iterations=2)
    path = flagged.save(tmp_path / "flagged.safetensors")
    loaded = Denoiser.load(path, device="cpu")
    assert loaded.noise_measurement == flagged.noise_measurement is not None
    assert "the noise measured on the data is 0." in loaded.describe_noise()
