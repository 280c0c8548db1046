"""Robust percentile normalisation, per channel, stored with the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .axes import PlaneLayout, spread_planes

LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.8
SAMPLE_PLANES = 16
SAMPLE_PIXELS_PER_PLANE = 2**20


@dataclass(frozen=True)
class Normalizer:
    """Maps intensities to roughly [0, 1] per channel: (x - low) / (high - low)."""

    low: tuple[float, ...]
    high: tuple[float, ...]

    @classmethod
    def from_data(cls, data, layout: PlaneLayout) -> "Normalizer":
        """Percentiles from up to 16 evenly spaced planes, subsampled: never loads a whole stack."""
        return cls.from_images([(data, layout)])

    @classmethod
    def from_images(cls, images) -> "Normalizer":
        """One normalisation for several (data, layout) images fitted together: percentiles over
        planes spread across them (spread_planes), each subsampled."""
        samples = []
        for data, layout, plane in spread_planes(images, SAMPLE_PLANES):
            stride = max(1, int(np.sqrt(layout.height * layout.width / SAMPLE_PIXELS_PER_PLANE)))
            samples.append(layout.read_plane(data, plane)[:, ::stride, ::stride])
        values = np.concatenate([s.reshape(s.shape[0], -1) for s in samples], axis=1)
        if values.min() == values.max():  # a flat image has no noise to learn; the noise fit would fail on it
            raise ValueError(f"the image is constant (every pixel is {float(values.flat[0]):g}): there is no "
                             "signal or noise to fit; check that the right image or layer is chosen")
        low = np.percentile(values, LOW_PERCENTILE, axis=1)
        high = np.percentile(values, HIGH_PERCENTILE, axis=1)
        # A flat channel would divide by zero; give it a unit range.
        high = np.where(high - low > 1e-12, high, low + 1.0)
        return cls(tuple(float(v) for v in low), tuple(float(v) for v in high))

    @property
    def scale(self) -> np.ndarray:
        return (np.asarray(self.high) - np.asarray(self.low)).astype(np.float32)

    def normalize(self, block: np.ndarray) -> np.ndarray:
        """(C, ...) or, with context planes, (k * C, ...) float32 in input units -> normalised units."""
        repeats = block.shape[0] // len(self.low)
        low = np.tile(np.asarray(self.low, dtype=np.float32), repeats).reshape(-1, *([1] * (block.ndim - 1)))
        return (block - low) / np.tile(self.scale, repeats).reshape(low.shape)

    def denormalize(self, block: np.ndarray) -> np.ndarray:
        low = np.asarray(self.low, dtype=np.float32).reshape(-1, *([1] * (block.ndim - 1)))
        return block * self.scale.reshape(low.shape) + low

    def to_dict(self) -> dict:
        return {"low": list(self.low), "high": list(self.high)}

    @classmethod
    def from_dict(cls, values: dict) -> "Normalizer":
        return cls(tuple(float(v) for v in values["low"]), tuple(float(v) for v in values["high"]))
