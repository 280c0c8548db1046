"""What the noise looks like, measured on the noisy data itself.

- `NoiseMeasurement`: the noise variance measured at binned signal levels, from Haar detail
  coefficients (no clean data, no network).
- `NoiseModel`: Poisson-Gaussian variance a * signal + b per channel: a line through the
  measurement, or given from a camera calibration.
- `measure_correlation` / `choose_pd`: spatial noise correlation and the pixel-shuffle factor
  that breaks it.
- `pd_down` / `pd_up`: pixel-shuffle downsampling (AP-BSN). With factor `pd`, the pixels with the
  same (y % pd, x % pd) form one sub-image; a blind-spot network run on each sub-image no longer
  sees the neighbours that share noise with the pixel it predicts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from .axes import PlaneLayout, spread_planes
from .patches import check_finite

SAMPLE_PLANES = 16
LEVEL_BINS = 32
MAD_TO_SIGMA = 1.4826  # a Gaussian's standard deviation over its median absolute deviation
# Excess lag-1 correlation of the high-pass residual above which the noise counts as correlated.
# Measured: pixel-independent benchmark images 0.04-0.11 (structure leaking into the residual),
# the 3x3-correlated case 0.60.
CORRELATED_ABOVE = 0.25
# A pixel-shuffle factor k is enough when the correlation left at lag k is below this.
RESIDUAL_CORRELATION = 0.05
MAX_AUTO_PD = 5
RESIDUAL_SMOOTHING = 3.0


def pd_down(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * factor^2, C, H / factor, W / factor)."""
    if factor == 1:
        return x
    return rearrange(x, "b c (h fy) (w fx) -> (b fy fx) c h w", fy=factor, fx=factor)


def pd_up(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse of pd_down."""
    if factor == 1:
        return x
    return rearrange(x, "(b fy fx) c h w -> b c (h fy) (w fx)", fy=factor, fx=factor)


def sample_planes(data, layout: PlaneLayout, count: int = SAMPLE_PLANES) -> list[np.ndarray]:
    """Up to `count` evenly spaced (C, Y, X) float64 planes."""
    return sample_image_planes([(data, layout)], count)


def sample_image_planes(images, count: int = SAMPLE_PLANES) -> list[np.ndarray]:
    """About `count` (C, Y, X) float64 planes spread over several (data, layout) images."""
    planes = []
    for data, layout, index in spread_planes(images, count):
        plane = layout.read_plane(data, index)
        check_finite(plane, f"{layout.describe_plane(index)} of the input")
        planes.append(plane.astype(np.float64))
    return planes


@dataclass(frozen=True)
class NoiseModel:
    """Noise variance = gain * signal + offset (input units, per channel), never below `floor`.

    Estimated from the noisy data (`estimate`), or given by the user from a camera calibration
    (`from_camera`, `given` True). The estimate cannot tell the sample's own fine grain from
    noise, so it counts that grain as noise: on D1 it finds offset 1.11 against the true read
    variance 1.0, which cost the posterior 0.1-0.2 dB and made the quality estimate 2-3 dB too
    hopeful in the benchmark runs. A calibrated model removed both there.
    """

    gain: tuple[float, ...]
    offset: tuple[float, ...]
    floor: tuple[float, ...]
    given: bool = False

    @classmethod
    def from_camera(cls, gain: float, read_noise: float, baseline: float = 0.0) -> NoiseModel:
        """A calibrated Poisson-Gaussian model in input units: `gain` input units per detected
        photon (electron), `read_noise` the read-noise standard deviation in input units and
        `baseline` the camera's dark offset (the value of a pixel that detected nothing), so
        that variance = gain * (signal - baseline) + read_noise^2. One channel; `for_channels`
        repeats it for multichannel data (the Denoiser does that at fit time)."""
        values = {"gain": gain, "read_noise": read_noise, "baseline": baseline}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"the noise model's {name} must be a finite number, got {value!r}")
        if gain < 0 or read_noise < 0:
            raise ValueError(
                f"gain and read noise cannot be negative (got gain {gain}, read noise {read_noise}); give "
                "the camera's gain in input units per photon and its read noise in input units"
            )
        if gain == 0 and read_noise == 0:
            raise ValueError("gain and read noise are both 0: that describes no noise at all; give at least one")
        offset = read_noise**2 - gain * baseline
        # The floor keeps the variance positive below the baseline, where the line would not.
        floor = 0.05 * read_noise**2 if read_noise > 0 else 0.05 * gain
        return cls((float(gain),), (float(offset),), (float(floor),), given=True)

    def for_channels(self, channels: int) -> NoiseModel:
        """This model for `channels` channels: a one-channel model is repeated for each."""
        if len(self.gain) == channels:
            return self
        if len(self.gain) == 1:
            return dataclasses.replace(self, gain=self.gain * channels, offset=self.offset * channels,
                                       floor=self.floor * channels)
        raise ValueError(f"the noise model describes {len(self.gain)} channels but the data has {channels}; "
                         "give one model for all channels or one per channel")

    @classmethod
    def estimate(cls, data, layout: PlaneLayout) -> "NoiseModel":
        """Fit the Poisson-Gaussian model from the noisy data alone: a line through the points
        of `NoiseMeasurement.of(data, layout)`."""
        return cls.fit(NoiseMeasurement.of(data, layout))

    @classmethod
    def fit(cls, measurement: NoiseMeasurement) -> NoiseModel:
        """A weighted line through each channel's measured (signal, variance) points."""
        fits = [_fit_line(np.asarray(s), np.asarray(v)) for s, v in zip(measurement.signal, measurement.variance)]
        gains, offsets, floors = zip(*fits)
        return cls(tuple(gains), tuple(offsets), tuple(floors))

    def variance(self, signal: np.ndarray, channel: int = 0) -> np.ndarray:
        """Noise variance at `signal` (input units)."""
        value = self.gain[channel] * np.asarray(signal, dtype=np.float64) + self.offset[channel]
        return np.maximum(value, self.floor[channel])

    def normalized(self, low: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gain, offset, floor) per channel for data normalised as (x - low) / scale."""
        gain = np.asarray(self.gain) / scale
        offset = (np.asarray(self.gain) * low + np.asarray(self.offset)) / scale**2
        return gain, offset, np.asarray(self.floor) / scale**2

    def describe(self) -> str:
        parts = [f"variance = {g:.4g} * signal {'+' if o >= 0 else '-'} {abs(o):.4g}" for g, o in zip(self.gain, self.offset)]
        text = "; ".join(parts if len(parts) == 1 else [f"channel {i}: {p}" for i, p in enumerate(parts)])
        return f"{text} ({'given' if self.given else 'estimated from the data'})"

    def to_dict(self) -> dict:
        return {"gain": list(self.gain), "offset": list(self.offset), "floor": list(self.floor), "given": self.given}

    @classmethod
    def from_dict(cls, values: dict) -> "NoiseModel":
        model = cls(*(tuple(float(v) for v in values[k]) for k in ("gain", "offset", "floor")),
                    given=bool(values.get("given", False)))
        if not len(model.gain) == len(model.offset) == len(model.floor) >= 1:
            raise ValueError("gain, offset and floor need one value per channel")
        return model


@dataclass(frozen=True)
class NoiseMeasurement:
    """The noise as measured on the data, before any model: for each channel, signal levels and
    the noise variance found at each (LEVEL_BINS points, input units).

    The diagonal Haar detail (a - b - c + d) / 2 of each 2x2 block cancels smooth signal and
    has the variance of one pixel's noise; the block mean gives that block's signal level.
    Blocks are binned by the mean of their 8 neighbouring blocks, whose noise is independent
    of theirs, so the bin averages carry no selection bias. Each bin's variance is robust (a
    median absolute deviation): structure that survives the Haar filter (edges, texture) sits
    in the tails, which the median ignores. The estimated NoiseModel is a line through these
    points; set beside a given (calibrated) model they show whether the calibration fits."""

    signal: tuple[tuple[float, ...], ...]
    variance: tuple[tuple[float, ...], ...]

    @classmethod
    def of(cls, data, layout: PlaneLayout) -> NoiseMeasurement:
        return cls.of_planes(sample_planes(data, layout))

    @classmethod
    def of_planes(cls, planes: list[np.ndarray]) -> NoiseMeasurement:
        """The measurement over (C, Y, X) planes (of one image, or of several fitted together)."""
        signals, variances = [], []
        for channel in range(len(planes[0])):
            statistics = [_haar_statistics(plane[channel]) for plane in planes]
            levels, neighbours, details = (np.concatenate(parts) for parts in zip(*statistics))
            signal, variance = _binned_variance(neighbours, levels, details)
            signals.append(tuple(float(v) for v in signal))
            variances.append(tuple(float(v) for v in variance))
        return cls(tuple(signals), tuple(variances))

    def model_ratio(self, model: NoiseModel) -> tuple[float, ...]:
        """Per channel, the median over the measured points of measured / model variance: 1 where
        the model describes the data; a calibration in the wrong units lands far from 1."""
        ratios = []
        for channel, (signal, variance) in enumerate(zip(self.signal, self.variance)):
            expected = model.variance(np.asarray(signal), channel)
            ratios.append(float(np.median(np.asarray(variance) / np.maximum(expected, 1e-30))))
        return tuple(ratios)

    def to_dict(self) -> dict:
        return {"signal": [list(s) for s in self.signal], "variance": [list(v) for v in self.variance]}

    @classmethod
    def from_dict(cls, values: dict) -> NoiseMeasurement:
        signal = tuple(tuple(float(v) for v in channel) for channel in values["signal"])
        variance = tuple(tuple(float(v) for v in channel) for channel in values["variance"])
        if len(signal) != len(variance) or any(len(s) != len(v) for s, v in zip(signal, variance)):
            raise ValueError("the noise measurement needs one variance per signal level, per channel")
        return cls(signal, variance)


def _haar_statistics(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.ndimage import uniform_filter

    height, width = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    image = image[:height, :width]
    a, b = image[0::2, 0::2], image[0::2, 1::2]
    c, d = image[1::2, 0::2], image[1::2, 1::2]
    level = (a + b + c + d) / 4
    detail = (a - b - c + d) / 2
    neighbour = (uniform_filter(level, 3, mode="reflect") * 9 - level) / 8
    return level.ravel(), neighbour.ravel(), detail.ravel()


def _binned_variance(neighbour: np.ndarray, level: np.ndarray, detail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean level, robust detail variance) of LEVEL_BINS equal-count bins by neighbour level."""
    order = np.argsort(neighbour, kind="stable")
    bins = np.array_split(order, LEVEL_BINS)
    x = np.array([level[b].mean() for b in bins])
    y = np.array([(MAD_TO_SIGMA * np.median(np.abs(detail[b] - np.median(detail[b])))) ** 2 for b in bins])
    return x, y


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(gain, offset, floor) of a line through the measured (signal, variance) points."""
    design = np.stack([x, np.ones_like(x)], axis=1)
    gain, offset = np.linalg.lstsq(design, y, rcond=None)[0]
    for _ in range(3):  # weights 1/variance: the squared detail's spread grows with its mean
        weight = 1 / np.maximum(design @ (gain, offset), 1e-3 * y.max())
        gain, offset = np.linalg.lstsq(design * weight[:, None], y * weight, rcond=None)[0]
    if gain <= 0:  # no signal dependence (or too little range to see it): Gaussian noise
        gain, offset = 0.0, float(np.mean(y))
    floor = 0.05 * float(y.min()) if y.min() > 0 else 1e-6 * max(float(y.max()), 1e-12)
    return float(gain), float(offset), floor


@dataclass(frozen=True)
class NoiseCorrelation:
    """Excess noise correlation (above white noise) of the high-pass residual, by lag."""

    by_lag: tuple[float, ...]  # lag 1, 2, ... along Y and X (the larger of the two)
    lag_one: tuple[float, float] | None = None  # lag 1 along Y (down a column) and along X (along a row)

    @property
    def correlated(self) -> bool:
        return self.by_lag[0] > CORRELATED_ABOVE

    @property
    def pd(self) -> int:
        """The pixel-shuffle factor that leaves the network no correlated neighbour."""
        if not self.correlated:
            return 1
        for lag, value in enumerate(self.by_lag[1:], start=2):
            if value < RESIDUAL_CORRELATION:
                return lag
        return MAX_AUTO_PD

    def describe(self) -> str:
        kind = "spatially correlated" if self.correlated else "pixel-independent"
        directions = "" if self.lag_one is None else \
            f": {self.lag_one[0]:.2f} down columns, {self.lag_one[1]:.2f} along rows"
        return f"noise looks {kind} (lag-1 correlation {self.by_lag[0]:.2f}{directions}), which suggests pd {self.pd}"

    def to_dict(self) -> dict:
        return {"by_lag": list(self.by_lag), "lag_one": None if self.lag_one is None else list(self.lag_one)}

    @classmethod
    def from_dict(cls, values: dict) -> NoiseCorrelation:
        lag_one = values.get("lag_one")
        return cls(tuple(float(v) for v in values["by_lag"]), None if lag_one is None else
                   (float(lag_one[0]), float(lag_one[1])))


def measure_correlation(data, layout: PlaneLayout) -> NoiseCorrelation:
    """Lag-k autocorrelation of y - gaussian(y), minus what white noise gives through the same
    filter, averaged over sampled planes and channels."""
    return correlation_of(sample_planes(data, layout, 4))


def correlation_of(planes: list[np.ndarray]) -> NoiseCorrelation:
    """measure_correlation over (C, Y, X) planes, which may differ in size."""
    from scipy.ndimage import gaussian_filter

    by_shape: dict[tuple[int, int], list[np.ndarray]] = {}
    for plane in planes:
        by_shape.setdefault(plane.shape[1:], []).extend(
            _autocorrelation(channel - gaussian_filter(channel, RESIDUAL_SMOOTHING)) for channel in plane)
    excesses, counts = [], []
    for shape, measured in by_shape.items():  # white noise of the planes' own size, through the same filter
        white = np.random.default_rng(0).standard_normal(shape)
        reference = _autocorrelation(white - gaussian_filter(white, RESIDUAL_SMOOTHING))
        excesses.append(np.mean(measured, axis=0) - reference)
        counts.append(len(measured))
    excess = excesses[0] if len(excesses) == 1 else np.average(excesses, axis=0, weights=counts)
    lags = range(1, MAX_AUTO_PD)
    return NoiseCorrelation(tuple(float(max(excess[k, 0], excess[0, k])) for k in lags),
                            (float(excess[1, 0]), float(excess[0, 1])))


def _autocorrelation(residual: np.ndarray) -> np.ndarray:
    """Normalised autocorrelation for lags 0..MAX_AUTO_PD along Y and X (via FFT)."""
    residual = residual - residual.mean()
    height, width = residual.shape
    spectrum = np.fft.rfft2(residual, s=(2 * height, 2 * width))
    correlation = np.fft.irfft2(np.abs(spectrum) ** 2, s=(2 * height, 2 * width))[: MAX_AUTO_PD + 1, : MAX_AUTO_PD + 1]
    return correlation / max(correlation[0, 0], 1e-30)
