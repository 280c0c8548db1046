"""The synthetic-noise cases of ../shared/BENCHMARK.md, built exactly as the protocol says."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORRELATION_KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64)
CORRELATION_KERNEL /= np.sqrt((CORRELATION_KERNEL**2).sum())

# Noise2Void (CAREamics 0.3.5, 300 s) as measured in BENCHMARK.md on a 2-core CPU.
NOISE2VOID_300S = {"D1": 30.48, "D2": 27.52, "D3": 31.20, "D4": 20.64}


@dataclass(frozen=True)
class Case:
    name: str
    reference: str
    axes: str
    peak: float
    read_sigma: float
    correlated: bool


CASES = {
    "D1": Case("D1", "img2d.tif", "YX", 20, 1, False),
    "D2": Case("D2", "nuclei.tif", "ZYX", 10, 1, False),
    "D3": Case("D3", "2D_timelapse.tif", "TYX", 20, 1, False),
    "D4": Case("D4", "img2d.tif", "YX", 20, 1, True),
}


def make_case(case: Case, data_dir: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """(clean float64, noisy float32) in photon units."""
    import tifffile

    reference = tifffile.imread(data_dir / case.reference).astype(np.float64)
    low, high = np.percentile(reference, [0.1, 99.9])
    clean = np.clip((reference - low) / (high - low), 0, 1) * case.peak
    rng = np.random.default_rng(0)
    if case.correlated:
        from scipy.ndimage import convolve

        white = rng.standard_normal(clean.shape)
        kernel = CORRELATION_KERNEL.reshape((1,) * (clean.ndim - 2) + (3, 3))
        noisy = clean + np.sqrt(clean + case.read_sigma**2) * convolve(white, kernel, mode="reflect")
    else:
        noisy = rng.poisson(clean) + rng.normal(0, case.read_sigma, clean.shape)
    return clean, noisy.astype(np.float32)


def psnr(estimate: np.ndarray, clean: np.ndarray) -> float:
    data_range = clean.max() - clean.min()
    mse = np.mean((np.asarray(estimate, dtype=np.float64) - clean) ** 2)
    return float(10 * np.log10(data_range**2 / mse))
