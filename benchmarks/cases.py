"""The synthetic-noise cases of ../shared/BENCHMARK.md, built exactly as the protocol says."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
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
    camera: Camera | None = None  # sCMOS effects on top of the Poisson-Gaussian noise (see Camera)


@dataclass(frozen=True)
class Camera:
    """A made-up sCMOS camera (gain 1 count per photon), for the developers' camera cases.

    Each pixel has its own offset (Normal around `baseline`, `offset_sigma`) and its own read
    noise (log-normal around `read_sigma`, `read_spread` in log units, with `noisy_fraction` of
    the pixels at `noisy_sigma`: the heavy tail of real sCMOS read noise); `hot_fraction` of the
    pixels are hot (a dark current of 20-200 counts per frame, with its own shot noise); every
    row of every frame carries a common offset (Normal, `row_sigma`). The offsets, read noise
    and hot pixels are the same in every frame: a fixed pattern. The clean reference includes
    the baseline (a pixel that detected nothing reads `baseline`), so the output stays in the
    input's units. The same camera without its effects (`without_camera`) reads
    baseline + Poisson(signal) + Normal(0, s^2) with s the read noise of its ordinary pixels as
    power (root mean square; `rms_read_sigma`): the clean Poisson-Gaussian twin, with the same
    read-noise power but no pattern, tail, hot pixels or row offsets.
    """

    baseline: float = 100.0
    offset_sigma: float = 2.0
    read_sigma: float = 1.4
    read_spread: float = 0.35
    noisy_fraction: float = 0.005
    noisy_sigma: float = 8.0
    hot_fraction: float = 0.001
    hot_counts: tuple[float, float] = (20.0, 200.0)
    row_sigma: float = 0.6
    seed: int = 1  # the camera's own pattern; the per-frame noise uses the protocol's seed 0

    @property
    def rms_read_sigma(self) -> float:
        """The root-mean-square read noise of the ordinary (log-normal) pixels."""
        return self.read_sigma * math.exp(self.read_spread**2)

    def pattern(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offset, read sigma, hot dark current), each (height, width)."""
        rng = np.random.default_rng(self.seed)
        offset = self.baseline + rng.normal(0, self.offset_sigma, (height, width))
        sigma = self.read_sigma * np.exp(self.read_spread * rng.standard_normal((height, width)))
        sigma[rng.random((height, width)) < self.noisy_fraction] = self.noisy_sigma
        hot = np.where(rng.random((height, width)) < self.hot_fraction,
                       rng.uniform(*self.hot_counts, (height, width)), 0.0)
        return offset, sigma, hot

    def record(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Frames of `clean` photons (..., Y, X) as this camera reads them."""
        offset, sigma, hot = self.pattern(*clean.shape[-2:])
        rows = rng.normal(0, self.row_sigma, (*clean.shape[:-1], 1))
        return rng.poisson(clean + hot) + offset + sigma * rng.standard_normal(clean.shape) + rows


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
    # Two more small single images for the fit-length benchmark (benchmarks/monotone.py): the
    # lower-left 256x256 quarter of D1's reference, and the middle plane of D2's stack.
    "S1": Case("S1", "img2d.tif", "YX", 20, 1, False, np.s_[256:512, 0:256]),
    "S2": Case("S2", "nuclei.tif", "YX", 10, 1, False, np.s_[30]),
    # The developers' sCMOS cases: D1's image and 32 planes of D2's through Camera() (read_sigma: the
    # camera's typical read noise, for the Poisson-Gaussian twin).
    "C1": Case("C1", "img2d.tif", "YX", 20, Camera().rms_read_sigma, False, camera=Camera()),
    "C2": Case("C2", "nuclei.tif", "ZYX", 10, Camera().rms_read_sigma, False, np.s_[14:46], camera=Camera()),
}


def make_case(case: Case, data_dir: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """(clean float64, noisy float32) in photon units (camera counts for a camera case, whose
    clean reference includes the camera's baseline)."""
    import tifffile

    if isinstance(case.reference, str):
        clean = _scaled(tifffile.imread(data_dir / case.reference)[case.region], case.peak)
    else:
        clean = np.stack([_scaled(tifffile.imread(data_dir / reference)[region], peak)
                          for reference, region, peak in zip(case.reference, case.region, case.peak)])
    rng = np.random.default_rng(0)
    if case.camera is not None:
        return clean + case.camera.baseline, case.camera.record(clean, rng).astype(np.float32)
    if case.correlated:
        from scipy.ndimage import convolve

        white = rng.standard_normal(clean.shape)
        kernel = CORRELATION_KERNEL.reshape((1,) * (clean.ndim - 2) + (3, 3))
        noisy = clean + np.sqrt(clean + case.read_sigma**2) * convolve(white, kernel, mode="reflect")
    else:
        noisy = rng.poisson(clean) + rng.normal(0, case.read_sigma, clean.shape)
    return clean, noisy.astype(np.float32)


def without_camera(case: Case, data_dir: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """A camera case's clean Poisson-Gaussian twin: the same clean reference (baseline included),
    noise baseline + Poisson(signal) + Normal(0, read_sigma^2), none of the camera's effects."""
    assert case.camera is not None
    clean, _ = make_case(replace(case, camera=None), data_dir)
    rng = np.random.default_rng(0)
    noisy = rng.poisson(clean) + rng.normal(0, case.read_sigma, clean.shape) + case.camera.baseline
    return clean + case.camera.baseline, noisy.astype(np.float32)


def _scaled(reference: np.ndarray, peak: float) -> np.ndarray:
    reference = reference.astype(np.float64)
    low, high = np.percentile(reference, [0.1, 99.9])
    return np.clip((reference - low) / (high - low), 0, 1) * peak


def psnr(estimate: np.ndarray, clean: np.ndarray) -> float:
    data_range = clean.max() - clean.min()
    mse = np.mean((np.asarray(estimate, dtype=np.float64) - clean) ** 2)
    return float(10 * np.log10(data_range**2 / mse))
