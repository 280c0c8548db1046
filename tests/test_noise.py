import numpy as np
import pytest
from scipy.ndimage import convolve

from napari_tbsn.axes import PlaneLayout
from napari_tbsn.noise import NoiseMeasurement, NoiseModel, measure_correlation

from .conftest import noisy_image


def _poisson_gaussian(gain: float, offset: float, shape=(4, 192, 192), seed=0):
    clean, _ = noisy_image(shape, seed=seed, peak=30.0)
    rng = np.random.default_rng(seed)
    noisy = gain * rng.poisson(clean / gain) + rng.normal(0, np.sqrt(offset), clean.shape)
    return clean, noisy.astype(np.float32)


@pytest.mark.parametrize("gain, offset", [(1.0, 1.0), (3.0, 10.0), (0.5, 0.2)])
def test_noise_model_recovers_gain_and_offset_without_clean_data(gain, offset):
    _, noisy = _poisson_gaussian(gain, offset)
    model = NoiseModel.estimate(noisy, PlaneLayout.of(noisy.shape, "ZYX"))
    assert model.gain[0] == pytest.approx(gain, rel=0.1)
    assert model.offset[0] == pytest.approx(offset, rel=0.2, abs=0.1)
    assert model.variance(np.array([10.0]))[0] == pytest.approx(gain * 10 + offset, rel=0.1)


def test_noise_measurement_follows_the_true_variance_and_the_model_is_its_line():
    gain, offset = 2.0, 4.0
    _, noisy = _poisson_gaussian(gain, offset)
    layout = PlaneLayout.of(noisy.shape, "ZYX")
    measurement = NoiseMeasurement.of(noisy, layout)
    signal, variance = np.asarray(measurement.signal[0]), np.asarray(measurement.variance[0])
    assert len(signal) == 32 and signal.max() > 10 * max(signal.min(), 0.5)
    truth_variance = gain * signal + offset
    np.testing.assert_allclose(variance, truth_variance, rtol=0.3)  # ~1000 blocks a point
    assert np.median(variance / truth_variance) == pytest.approx(1.0, abs=0.05)
    assert NoiseModel.fit(measurement) == NoiseModel.estimate(noisy, layout)
    truth = NoiseModel.from_camera(gain, read_noise=offset**0.5)
    assert measurement.model_ratio(truth)[0] == pytest.approx(1.0, abs=0.1)
    wrong_units = NoiseModel.from_camera(4 * gain, read_noise=2 * offset**0.5)  # variance 4x
    assert measurement.model_ratio(wrong_units)[0] == pytest.approx(0.25, rel=0.1)
    assert NoiseMeasurement.from_dict(measurement.to_dict()) == measurement
    with pytest.raises(ValueError, match="one variance per signal level"):
        NoiseMeasurement.from_dict({"signal": [[1.0, 2.0]], "variance": [[1.0]]})


def test_noise_model_in_normalised_units_and_round_trip():
    model = NoiseModel(gain=(2.0,), offset=(5.0,), floor=(0.1,))
    low, scale = np.array([100.0]), np.array([50.0])
    gain, offset, floor = model.normalized(low, scale)
    signal = 0.4  # normalised, i.e. 100 + 0.4 * 50 = 120 in input units
    assert gain[0] * signal + offset[0] == pytest.approx(model.variance(np.array([120.0]))[0] / 50.0**2)
    assert NoiseModel.from_dict(model.to_dict()) == model
    assert "2 * signal + 5" in model.describe()


def test_correlated_noise_is_detected_and_gets_a_pixel_shuffle_factor():
    rng = np.random.default_rng(0)
    clean, _ = noisy_image((256, 256), seed=3)
    white = clean + rng.normal(0, 2, clean.shape)
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], float)
    correlated = clean + 2 * convolve(rng.normal(0, 1, clean.shape), kernel / np.sqrt((kernel**2).sum()))
    independent = measure_correlation(white, PlaneLayout.of(white.shape, "YX"))
    assert not independent.correlated and independent.pd == 1
    found = measure_correlation(correlated, PlaneLayout.of(correlated.shape, "YX"))
    assert found.correlated and found.pd >= 2
    assert "correlated" in found.describe()


def test_camera_noise_model_is_the_calibration_given():
    model = NoiseModel.from_camera(gain=2.5, read_noise=3.0, baseline=100.0)
    signal = np.array([100.0, 140.0])
    assert model.variance(signal) == pytest.approx([9.0, 2.5 * 40 + 9.0])
    assert model.variance(np.array([0.0]))[0] > 0  # below the baseline the floor holds
    assert model.given and "given" in model.describe()
    assert NoiseModel.from_dict(model.to_dict()) == model
    old_file = {k: v for k, v in model.to_dict().items() if k != "given"}
    assert not NoiseModel.from_dict(old_file).given  # models saved before calibration support
    three = model.for_channels(3)
    assert three.gain == (2.5,) * 3 and three.given
    with pytest.raises(ValueError, match="describes 3 channels but the data has 2"):
        three.for_channels(2)


@pytest.mark.parametrize("gain, read_noise, message", [
    (-1.0, 1.0, "cannot be negative"),
    (0.0, 0.0, "no noise at all"),
    (float("nan"), 1.0, "finite number"),
    (1.0, "2", "finite number"),
])
def test_bad_camera_noise_model_is_explained(gain, read_noise, message):
    with pytest.raises(ValueError, match=message):
        NoiseModel.from_camera(gain, read_noise)
