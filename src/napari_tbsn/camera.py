"""Camera effects found and taken out before the network sees the data (sCMOS cameras).

An sCMOS camera adds to every frame a per-pixel offset and per-pixel read noise (the same in
every frame: a fixed pattern), hot pixels, and offsets common to a whole row (or column) of one
frame. A blind-spot network takes what repeats in every plane of a stack for structure (the
stack context shows it the same offset at p in the neighbouring planes), the posterior folds a
hot pixel's own value back in, and the network copies a row's common offset from the row's
other pixels. So the camera is corrected before the fit and the prediction read a plane, from a
dark calibration where there is one (`Calibration`) or from the data itself (`detect`):

- fixed offsets: the dark frames' mean; or, in a stack, each pixel's mean difference to the
  median of its 8 neighbours over the planes (structure moves from plane to plane, the pattern
  does not), weighted by the share of it that two halves of the stack agree on;
- hot and very noisy pixels: replaced by the median of their own lattice neighbours; their
  value is never used (the posterior gives the blind-spot mean there, the lattice filter skips
  them), and with a calibration every pixel's own read variance enters the noise model;
- line offsets: each row's (column's) median minus the median of its neighbouring rows'.

Exactly blind. TBSN's output at p never sees p's lattice p + 2Z^2 and may see every other pixel
of the plane and of its context planes. So a correction of pixel q uses only q's own lattice
in q's own plane (hot-pixel values, line offsets): the network sees q only off p's lattice,
where no correction reads y_p. A stack's fixed-offset map is estimated twice, from the planes
of even and of odd flat index, and everything read to predict plane z (z and its context) is
corrected with the map that does not hold z. The lattice filter reads residuals on p's own
lattice, whose line offsets did read y_p: it is not used where line offsets are corrected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .axes import PlaneLayout, PlaneSource, Region
from .errors import BadInput

MAD_TO_SIGMA = 1.4826
HOT_SIGMAS = 8.0  # a pixel this many noise sd above every neighbour (or its plane's pattern) is hot
NOISY_VARIANCE = 9.0  # a pixel whose noise variance is this many times the typical one is unusable
HOT_FRAME_SIGMAS = 3.0  # and this many sd of one frame's noise above the neighbours, on average
MAX_HOT_FRACTION = 0.02  # more "hot" pixels than this are the sample's own spikes, not a camera's
PATTERN_PLANES = 64  # planes sampled to estimate the fixed pattern
PATTERN_MIN_PLANES = 8  # fewer planes give no estimate of a fixed pattern
PATTERN_SHARE = 0.3  # fixed offsets count as found when the halves agree on this share of the map
LINE_SHARE = 0.3  # line offsets count as found when the two lattices of a line agree on this share
LINE_PLANES = 8  # planes sampled to look for line offsets
LINE_WINDOW = 4  # neighbouring lines on each side whose medians give a line's expected median
LEVEL_BINS = 16
_RING = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)
_LATTICES = ((0, 0), (0, 1), (1, 0), (1, 1))


@dataclass(frozen=True)
class Calibration:
    """A camera's per-pixel dark offset and read variance (input units), from dark frames."""

    offset: np.ndarray  # (Y, X)
    variance: np.ndarray | None  # (Y, X); None from a single dark frame
    frames: int

    @classmethod
    def from_dark(cls, dark, axes: str | None = None) -> Calibration:
        """From a dark stack: frames taken with the shutter closed, (frames, Y, X) or one (Y, X)
        frame (which gives offsets but no read variance)."""
        dark = np.asarray(dark, dtype=np.float64)
        if axes is not None and len(axes) != dark.ndim:
            raise BadInput(f"the dark stack has {dark.ndim} dimensions but axes {axes!r}; give one letter per axis")
        if dark.ndim == 2:
            dark = dark[np.newaxis]
        if dark.ndim != 3:
            raise BadInput(f"a dark stack is (frames, Y, X) or one (Y, X) frame, got shape {dark.shape}; "
                           "give the dark frames of one camera, one channel")
        if not np.isfinite(dark).all():
            raise BadInput("the dark stack holds NaN or infinite values; give the camera's raw dark frames")
        variance = dark.var(axis=0, ddof=1) if len(dark) > 1 else None
        return cls(dark.mean(axis=0), variance, len(dark))

    def check_fits(self, layout: PlaneLayout) -> None:
        if self.offset.shape != (layout.height, layout.width):
            raise BadInput(f"the dark frames are {self.offset.shape[0]}x{self.offset.shape[1]} pixels but the image "
                           f"is {layout.height}x{layout.width}; use dark frames from the same camera and crop")


@dataclass
class CameraCorrection:
    """What is taken out of this data's planes (maps per channel, (C, Y, X), input units)."""

    source: str  # "dark frames" or "detected"
    halves: tuple[np.ndarray, np.ndarray] | None = None  # offset maps without odd / even planes
    hot: np.ndarray | None = None  # bool: pixels whose value is never used
    extra_variance: np.ndarray | None = None  # read variance above the typical pixel's
    lines: tuple[str, ...] = ()  # "rows", "columns"
    line_weight: dict = field(default_factory=dict)  # direction -> share of a line's offset taken out
    found: list[str] = field(default_factory=list)

    @property
    def per_pixel(self) -> bool:
        """Whether the tile model needs per-pixel maps (pixel_maps) beside the data."""
        return self.hot is not None or self.extra_variance is not None

    @property
    def active(self) -> bool:
        return self.halves is not None or self.hot is not None or bool(self.lines) or self.extra_variance is not None

    def describe(self) -> str:
        return "; ".join(self.found) if self.found else "no camera pattern found"

    def to_dict(self) -> dict:
        return {"source": self.source, "found": list(self.found), "lines": list(self.lines),
                "hot_pixels": int(self.hot.sum()) if self.hot is not None else 0}

    def offset_for(self, flat_plane: int | None) -> np.ndarray | None:
        """The offset map that plane `flat_plane` (None: any read) and its context subtract: the
        half without that plane (both halves averaged for reads that predict nothing)."""
        if self.halves is None:
            return None
        if flat_plane is None:
            return (self.halves[0] + self.halves[1]) / 2
        return self.halves[flat_plane % 2]

    def correct(self, block: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        """A whole (C, Y, X) plane with the camera taken out."""
        block = block.astype(np.float32, copy=True)
        if offset is not None:
            block -= offset
        if self.hot is not None:
            for channel in range(len(block)):
                replace_hot(block[channel], self.hot[min(channel, len(self.hot) - 1)])
        for direction in self.lines:
            for channel in range(len(block)):
                remove_line_offsets(block[channel], direction, self.line_weight[direction])
        return block

    def pixel_maps(self, channels: int, region: Region | None = None) -> np.ndarray:
        """(2C, Y, X) float32 for the tile model: 1 where a pixel's value is never used, then
        its read variance above the typical pixel's (input units)."""
        def cut(maps: np.ndarray) -> np.ndarray:
            maps = np.broadcast_to(maps, (channels, *maps.shape[1:]))
            return maps if region is None else maps[(slice(None), *region)]

        shape = self.hot.shape[1:] if self.hot is not None else self.extra_variance.shape[1:]
        hot = self.hot if self.hot is not None else np.zeros((1, *shape), dtype=bool)
        extra = self.extra_variance if self.extra_variance is not None else np.zeros((1, *shape), dtype=np.float32)
        return np.concatenate([cut(hot).astype(np.float32), cut(extra).astype(np.float32)])


class CorrectedStack(PlaneSource):
    """`data` read plane by plane with the camera taken out (a read-only view)."""

    def __init__(self, data, layout: PlaneLayout, correction: CameraCorrection) -> None:
        self.source, self.layout, self.correction = data, layout, correction
        self.shape, self.dtype, self.ndim = tuple(data.shape), np.dtype(np.float32), len(data.shape)

    def _plane(self, plane: tuple[int, ...], region: Region | None, flat_target: int | None) -> np.ndarray:
        whole = self.layout.read_plane(self.source, plane)  # line offsets need whole lines
        corrected = self.correction.correct(whole, self.correction.offset_for(flat_target))
        return corrected if region is None else np.ascontiguousarray(corrected[(slice(None), *region)])

    def read_plane(self, plane: tuple[int, ...], region: Region | None = None) -> np.ndarray:
        return self._plane(plane, region, None)

    def read_plane_with_context(self, plane: tuple[int, ...], planes_each_side: int,
                                region: Region | None = None) -> np.ndarray:
        target = self.layout.flat_index(plane)
        planes = [plane, *self.layout.context_planes(plane, planes_each_side)]
        blocks = [self._plane(each, region, target) for each in planes]
        return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def replace_hot(image: np.ndarray, hot: np.ndarray) -> None:
    """Put the median of its 8 lattice neighbours (2 pixels away) in place of every hot pixel
    of the (Y, X) `image`, in place. Hot neighbours are left out where others remain."""
    ys, xs = np.nonzero(hot)
    if not len(ys):
        return
    height, width = image.shape
    values = []
    for dy in (-2, 0, 2):
        for dx in (-2, 0, 2):
            if dy or dx:
                y, x = _reflect(ys + dy, height, ys), _reflect(xs + dx, width, xs)
                value = image[y, x].astype(np.float64)
                values.append(np.where(hot[y, x], np.nan, value))
    values = np.stack(values)
    all_hot = np.isnan(values).all(axis=0)
    replacement = np.where(all_hot, 0.0, np.nanmedian(np.where(all_hot, 0.0, values), axis=0))
    image[ys, xs] = replacement


def _reflect(index: np.ndarray, length: int, origin: np.ndarray) -> np.ndarray:
    """Lattice neighbours past the edge mirrored back by 2-pixel steps (keeping the lattice)."""
    index = np.where(index < 0, origin + 2 * (origin + 2 <= length - 1), index)
    return np.where(index > length - 1, origin - 2 * (origin >= 2), index)


def line_profile(image: np.ndarray, direction: str) -> np.ndarray:
    """(2, 2, lines/2) offsets of each line (row or column) of the (Y, X) `image`, for each
    lattice: the line's median over that lattice minus the median of the medians of the
    LINE_WINDOW lines of that lattice on each side (structure varies slowly from line to
    line; an offset belongs to one line)."""
    source = image if direction == "rows" else image.T
    profiles = np.empty((2, 2, (source.shape[0] + 1) // 2))
    for a, b in _LATTICES:
        lattice = source[a::2, b::2]
        medians = np.median(lattice, axis=1)
        padded = np.pad(medians, LINE_WINDOW, mode="reflect")
        neighbours = np.stack([padded[LINE_WINDOW + k : LINE_WINDOW + k + len(medians)]
                               for k in range(-LINE_WINDOW, LINE_WINDOW + 1) if k])
        profile = medians - np.median(neighbours, axis=0)
        profiles[a, b, : len(profile)] = profile
        profiles[a, b, len(profile):] = 0.0
    return profiles


def remove_line_offsets(image: np.ndarray, direction: str, weight: float) -> None:
    """Subtract `weight` times each line's offset, per lattice, from the (Y, X) `image`."""
    profiles = line_profile(image, direction)
    target = image if direction == "rows" else image.T  # a view: writes reach `image`
    for a, b in _LATTICES:
        lattice = target[a::2, b::2]
        lattice -= (weight * profiles[a, b, : lattice.shape[0]])[:, None].astype(np.float32)


def ring_median(image: np.ndarray) -> np.ndarray:
    """The median of each pixel's 8 neighbours (mirrored at the edges)."""
    from scipy.ndimage import median_filter

    return median_filter(image, footprint=_RING, mode="mirror")


def _robust_sigma(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return MAD_TO_SIGMA * float(np.median(np.abs(values - np.median(values)))) if values.size else 0.0


def _binned(level: np.ndarray, values: np.ndarray, statistic) -> np.ndarray:
    """Per pixel, `statistic` of `values` among pixels of a similar `level` (equal-count bins)."""
    order = np.argsort(level, axis=None, kind="stable")
    result = np.empty(level.size)
    for part in np.array_split(order, LEVEL_BINS):
        result[part] = statistic(values.ravel()[part])
    return result.reshape(level.shape)


def find_correction(data, layout: PlaneLayout, calibration: Calibration | None = None) -> CameraCorrection:
    """What to take out of `data`'s planes: the calibration's maps where one is given, else
    what the data shows; then line offsets, looked for on planes with the rest taken out."""
    if calibration is not None:
        correction = from_calibration(calibration, layout)
    elif layout.plane_count >= PATTERN_MIN_PLANES:
        correction = detect_pattern(data, layout)
    else:
        correction = detect_hot_pixels(data, layout)
    _find_lines(data, layout, correction)
    return correction


def from_calibration(calibration: Calibration, layout: PlaneLayout) -> CameraCorrection:
    """A dark calibration's offsets (less their mean: the output keeps the input's baseline),
    per-pixel read variance, and unusable pixels (read variance NOISY_VARIANCE times the
    typical one: hot pixels' dark current, the read noise's far tail)."""
    calibration.check_fits(layout)
    offset = (calibration.offset - calibration.offset.mean()).astype(np.float32)[np.newaxis]
    correction = CameraCorrection("dark frames", halves=(offset, offset))  # not from the data: no halves needed
    correction.found.append(f"fixed offsets from {calibration.frames} dark frame(s) (sd {offset.std():.3g})")
    if calibration.variance is not None:
        typical = float(np.median(calibration.variance))
        hot = calibration.variance > NOISY_VARIANCE * typical
        correction.hot = hot[np.newaxis] if hot.any() else None
        correction.extra_variance = np.where(hot, 0.0, calibration.variance - typical).astype(np.float32)[np.newaxis]
        correction.found.append(f"per-pixel read variance (typical {typical:.3g}); {int(hot.sum())} hot or very "
                                "noisy pixel(s) never used")
    return correction


def detect_pattern(data, layout: PlaneLayout) -> CameraCorrection:
    """Fixed offsets, hot and very noisy pixels of a stack, from up to PATTERN_PLANES planes:
    each pixel's difference r to the median of its 8 neighbours, over the planes. Its mean is
    the pattern plus what structure stays in place; halves of the stack agree on the pattern
    and on static structure, not on the noise, so the share they agree on weights the map."""
    sums = np.zeros((2, 2, layout.channels, layout.height, layout.width))  # parity, (r, r^2)
    level = np.zeros((layout.channels, layout.height, layout.width))
    counts = [0, 0]
    for plane in layout.evenly_spaced(PATTERN_PLANES):
        block = layout.read_plane(data, plane).astype(np.float64)
        parity = layout.flat_index(plane) % 2
        for channel, image in enumerate(block):
            neighbours = ring_median(image)
            residual = image - neighbours
            sums[parity, 0, channel] += residual
            sums[parity, 1, channel] += residual**2
            level[channel] += neighbours
        counts[parity] += 1
    if min(counts) < PATTERN_MIN_PLANES // 2:  # halves this thin give no estimate
        return detect_hot_pixels(data, layout)
    total = sum(counts)
    mean = sums[:, 0].sum(axis=0) / total
    variance = np.maximum(sums[:, 1].sum(axis=0) / total - mean**2, 0)
    level /= total
    correction = CameraCorrection("detected")
    hot = np.zeros(mean.shape, dtype=bool)
    for channel in range(layout.channels):
        typical = _binned(level[channel], variance[channel], np.median)  # the noise variance of a typical pixel
        # Hot: far above the map's spread and above a frame's own noise (static fine structure
        # also stands out of a map averaged over many planes, but not out of one frame's noise).
        excess = mean[channel] - np.median(mean[channel])
        high = (excess > HOT_SIGMAS * _robust_sigma(mean[channel])) & (excess > HOT_FRAME_SIGMAS * np.sqrt(typical))
        hot[channel] = high | (variance[channel] > NOISY_VARIANCE * typical)
    hot = _unless_too_many(hot, correction)
    if hot is not None:
        correction.hot = hot
        correction.found.append(f"{int(hot.sum())} hot or very noisy pixel(s) (the same in every plane): replaced "
                                "by their neighbours' median and never used as data")
    halves = [sums[parity, 0] / max(counts[parity], 1) for parity in (1, 0)]  # without even, without odd planes
    usable = ~hot if hot is not None else np.ones(mean.shape, dtype=bool)
    for half in halves:  # offsets about the baseline: the output keeps the input's level
        for channel in range(layout.channels):
            half[channel] -= half[channel][usable[channel]].mean()
    shares = [_agreement(halves[0][c][usable[c]], halves[1][c][usable[c]]) for c in range(layout.channels)]
    share = min(shares)
    if share > PATTERN_SHARE:
        weights = np.asarray(shares, dtype=np.float32).reshape(-1, 1, 1)
        correction.halves = tuple((weights * half).astype(np.float32) for half in halves)
        correction.found.append(f"fixed offsets (the same in every plane; sd {float(np.std(mean[usable])):.3g}, "
                                f"{share:.0%} of them repeat between halves of the stack): taken out")
    return correction


def detect_hot_pixels(data, layout: PlaneLayout) -> CameraCorrection:
    """Hot pixels of a single image (or a few planes): pixels HOT_SIGMAS noise sd above all 8
    neighbours in every plane looked at (the noise sd of pixels at a similar level)."""
    correction = CameraCorrection("detected")
    hot = None
    for plane in layout.evenly_spaced(4):
        block = layout.read_plane(data, plane).astype(np.float64)
        found = np.zeros(block.shape, dtype=bool)
        for channel, image in enumerate(block):
            from scipy.ndimage import maximum_filter

            neighbours = ring_median(image)
            sigma = _binned(neighbours, image - neighbours, _robust_sigma)
            found[channel] = image - maximum_filter(image, footprint=_RING, mode="mirror") > HOT_SIGMAS * sigma
        hot = found if hot is None else hot & found
    hot = _unless_too_many(hot, correction)
    if hot is not None:
        correction.hot = hot
        correction.found.append(f"{int(hot.sum())} hot pixel(s): replaced by their neighbours' median and never "
                                "used as data")
    return correction


def _unless_too_many(hot: np.ndarray, correction: CameraCorrection) -> np.ndarray | None:
    if not hot.any():
        return None
    if hot.mean() > MAX_HOT_FRACTION:
        correction.found.append(f"{int(hot.sum())} isolated bright pixels ({hot.mean():.2%}) kept as they are: too "
                                "many for a camera's hot pixels")
        return None
    return hot


def _agreement(first: np.ndarray, second: np.ndarray) -> float:
    """The share of two noisy estimates of one map that they agree on: cov / mean variance."""
    first, second = first - first.mean(), second - second.mean()
    variance = (np.mean(first**2) + np.mean(second**2)) / 2
    return float(np.mean(first * second) / variance) if variance > 0 else 0.0


def _find_lines(data, layout: PlaneLayout, correction: CameraCorrection) -> None:
    """Offsets common to a row (or column) of a frame. The left and right halves of a line
    share its offset, not its noise (even spatially correlated noise) nor, mostly, its
    structure: the share of their line profiles they agree on is the offsets'. A line's offset
    is then taken out in proportion to its share of the whole line's profile (Wiener)."""
    for direction in ("rows", "columns"):
        shares = []
        for plane in layout.evenly_spaced(LINE_PLANES):
            block = correction.correct(layout.read_plane(data, plane), correction.offset_for(None))
            for image in block.astype(np.float64):
                image = image if direction == "rows" else image.T
                half = image.shape[1] // 2
                left, right = (line_profile(part, "rows") for part in (image[:, :half], image[:, half:]))
                shares += [_agreement(left[a, b], right[a, b]) for a, b in _LATTICES]
        share = float(np.median(shares))
        if share > LINE_SHARE:
            correction.lines += (direction,)
            # A half line's profile has twice the noise variance of the whole line's.
            correction.line_weight[direction] = min(share / (share + (1 - share) / 2), 1.0)
            correction.found.append(f"offsets common to whole {direction} of a frame ({share:.0%} of the {direction}' "
                                    f"profile): taken out, each {direction[:-1]} by its own lattice")


def camera_record(setting, correction: CameraCorrection | None) -> dict:
    """What a model file says of the camera: how it was handled and what was found."""
    mode = "off" if setting == "off" else "dark frames" if isinstance(setting, Calibration) else "auto"
    return {"mode": mode, **(correction.to_dict() if correction is not None else {"found": []})}
