"""How a multichannel image is fitted: the channels jointly (one network reads them all) or
independently (the channels as samples of one single-channel network).

Joint fitting helps where the channels show the same structures (a fluorophore imaged in two
spectral bands, RGB): each channel's blind spot is filled from the others. Independent stains
share little structure pixel by pixel; a joint network then splits its capacity over them and
loses to one that sees every channel as another sample of the same task. "auto" tells the two
apart by how well the channels' structures correlate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .axes import PlaneLayout
from .normalization import Normalizer

CHANNEL_MODES = ("auto", "joint", "independent")
# Channels whose band-passed structures correlate at least this much (mean over pairs) are fitted jointly.
JOINT_CORRELATION = 0.5
SAMPLE_PLANES = 4
SAMPLE_SIDE = 512  # the central crop of each sampled plane
FINE_SIGMA, COARSE_SIGMA = 2.0, 6.0  # the band-pass: blurred enough to leave the noise out, edges kept


def mode_allows(asked: str, mode: str) -> bool:
    """Whether a model whose channels were fitted in `mode` ("single", "joint" or
    "independent") can be fine-tuned where `asked` is what the user asks for."""
    return asked == "auto" or mode in (asked, "single")


@dataclass(frozen=True)
class ChannelChoice:
    """How the channels are fitted, and why."""

    mode: str  # "joint", "independent", or "single" for one channel
    correlation: float | None = None  # the channels' structure correlation, where measured
    reason: str = ""

    @property
    def independent(self) -> bool:
        return self.mode == "independent"

    def describe(self) -> str:
        return f"channels fitted {self.mode}: {self.reason}" if self.reason else f"channels fitted {self.mode}"


def check_channel_mode(mode) -> None:
    if mode not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {', '.join(CHANNEL_MODES)}, got {mode!r}")


def choose_channels(mode: str, data, layout: PlaneLayout, normalizer: Normalizer) -> ChannelChoice:
    """The channel handling for `mode` on this data ("auto" measures the structure correlation)."""
    if layout.channels == 1:
        return ChannelChoice("single")
    if mode != "auto":
        return ChannelChoice(mode, reason="as asked")
    correlation = structure_correlation(data, layout, normalizer)
    if correlation >= JOINT_CORRELATION:
        return ChannelChoice("joint", correlation, f"their structures correlate ({correlation:.2f} >= "
                             f"{JOINT_CORRELATION}), so each channel helps denoise the others")
    return ChannelChoice("independent", correlation, f"their structures hardly correlate ({correlation:.2f} < "
                         f"{JOINT_CORRELATION}), so each channel is denoised as a sample of one network")


def structure_correlation(data, layout: PlaneLayout, normalizer: Normalizer) -> float:
    """Mean over channel pairs of the correlation of the channels' band-passed images (a
    difference of Gaussians, which leaves out the noise and the background), over a few planes."""
    from scipy.ndimage import gaussian_filter

    side_y, side_x = min(layout.height, SAMPLE_SIDE), min(layout.width, SAMPLE_SIDE)
    top, left = (layout.height - side_y) // 2, (layout.width - side_x) // 2
    region = (slice(top, top + side_y), slice(left, left + side_x))
    pairs: list[float] = []
    for plane in layout.evenly_spaced(SAMPLE_PLANES):
        block = normalizer.normalize(np.asarray(layout.read_plane(data, plane, region=region), dtype=np.float32))
        bands = [gaussian_filter(channel, FINE_SIGMA) - gaussian_filter(channel, COARSE_SIGMA) for channel in block]
        for first in range(len(bands)):
            for second in range(first + 1, len(bands)):
                pairs.append(_correlation(bands[first], bands[second]))
    return float(np.mean(pairs))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    scale = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / scale) if scale > 0 else 0.0
