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
    """A noisy case. A multichannel case lists one reference, peak and region per channel: each
    channel is scaled by its own percentiles to its own peak, then the noise is drawn as for one."""

    name: str
    reference: str | tuple[str, ...]
    axes: str
    peak: float | tuple[float, ...]
    read_sigma: float
    correlated: bool
    region: tuple = ()  # what of the reference to take (numpy index), one per channel when it has several


CASES = {
    "D1": Case("D1", "img2d.tif", "YX", 20, 1, False),
    "D2": Case("D2", "nuclei.tif", "ZYX", 10, 1, False),
    "D3": Case("D3", "2D_timelapse.tif", "TYX", 20, 1, False),
    "D4": Case("D4", "img2d.tif", "YX", 20, 1, True),
    # Three unrelated stains in one image: an img2d crop, a nuclei plane, a time-lapse frame.
    "D5": Case("D5", ("img2d.tif", "nuclei.tif", "2D_timelapse.tif"), "CYX", (30, 10, 20), 1, False,
               (np.s_[128:384, 128:384], np.s_[30], np.s_[0, 128:384, 128:384])),
    # A small single 2D image (a 320x320 crop of D1's reference), where long fits used to lose.
    "D6": Case("D6", "img2d.tif", "YX", 20, 1, False, np.s_[96:416, 96:416]),
}


def make_case(case: Case, data_dir: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """(clean float64, noisy float32) in photon units."""
    import tifffile

    if isinstance(case.reference, str):
        clean = _scaled(tifffile.imread(data_dir / case.reference)[case.region], case.peak)
    else:
        clean = np.stack([_scaled(tifffile.imread(data_dir / reference)[region], peak)
                          for reference, region, peak in zip(case.reference, case.region, case.peak)])
    rng = np.random.default_rng(0)
    if case.correlated:
        from scipy.ndimage import convolve

        white = rng.standard_normal(clean.shape)
        kernel = CORRELATION_KERNEL.reshape((1,) * (clean.ndim - 2) + (3, 3))
        noisy = clean + np.sqrt(clean + case.read_sigma**2) * convolve(white, kernel, mode="reflect")
    else:
        noisy = rng.poisson(clean) + rng.normal(0, case.read_sigma, clean.shape)
    return clean, noisy.astype(np.float32)


def _scaled(reference: np.ndarray, peak: float) -> np.ndarray:
    reference = reference.astype(np.float64)
    low, high = np.percentile(reference, [0.1, 99.9])
    return np.clip((reference - low) / (high - low), 0, 1) * peak


def psnr(estimate: np.ndarray, clean: np.ndarray) -> float:
    data_range = clean.max() - clean.min()
    mse = np.mean((np.asarray(estimate, dtype=np.float64) - clean) ** 2)
    return float(10 * np.log10(data_range**2 / mse))
