"""Camera effects found and taken out before the network sees the data (sCMOS cameras).

An sCMOS camera adds to every frame a per-pixel offset and per-pixel read noise (the same in
every frame: a fixed pattern), hot pixels, and offsets common to a whole row (or column) of one
frame. A blind-spot network takes what repeats in every plane of a stack for structure (the
stack context shows it the same offset at p in the neighbouring planes), the posterior folds a
hot pixel's own value back in, and the network copies a row's common offset from the row's
other pixels. So the camera is corrected before the fit and the prediction read a plane, from a
dark calibration where there is one (`Calibration`) or from the data itself (`detect`):

- fixed offsets: the dark frames' mean; or, in a stack, each pixel's mean difference to the
  median of its 8 lattice neighbours over the planes (structure moves from plane to plane, the pattern
  does not), weighted by the share of it that two halves of the stack agree on;
- hot and very noisy pixels: replaced by the median of their own lattice neighbours; their
  value is never used (the posterior gives the blind-spot mean there, the lattice filter skips
  them), and with a calibration every pixel's own read variance enters the noise model;
- line offsets: each row's (column's) median minus the median of its neighbouring rows'; or, in
  a stack whose structure changes slowly from plane to plane (where those estimates vary less),
  each row's level minus the level the same rows of the planes around give it.

Exactly blind. TBSN's output at p never sees p's lattice p + 2Z^2 and may see every other pixel
of the plane and of its context planes. So a correction of pixel q uses only q's own lattice
in q's own plane (hot-pixel values, line offsets): the network sees q only off p's lattice,
where no correction reads y_p. Line offsets measured across planes read, for the plane z
predicted, a line's level on its own lattice and the planes around z; for its context planes,
their own lines and the planes around them, never z. A stack's fixed-offset map is estimated
twice, from the planes of even and of odd flat index, and everything read to predict plane z (z
and its context) is corrected with the map that does not hold z. The lattice filter reads
residuals on p's own lattice, whose line offsets did read y_p: beside line offsets it reads them
centred along the lines, from the plane before its line offsets came out
(lattice.centred_residual_features).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scipy.ndimage import correlate, uniform_filter1d

from .axes import PlaneLayout, PlaneSource, Region
from .errors import BadInput
from .patches import check_finite

MAD_TO_SIGMA = 1.4826
MEAN_DEVIATION_TO_SIGMA = 1.2533  # a Gaussian's sd over its mean absolute deviation
HOT_SIGMAS = 8.0  # a pixel this many sd above its stack's mean pattern is hot
# In one plane: this many noise sd above the second brightest of its 8 lattice neighbours (a hot
# neighbour does not hide it). Measured on C1: 7 finds 251 of its 258 hot pixels (the brightest
# neighbour and 8 sd: 239) and nothing on D1, D4, D5 or D6 (6.5: a pixel of D5).
HOT_SIGMAS_IN_PLANE = 7.0
NOISY_VARIANCE = 9.0  # a pixel whose noise variance is this many times the typical one is unusable
# The same from half of a stack's planes (tests/test_camera.py's 12-plane stack: at 9x, 14 pixels
# per half at moving cells' edges; at 16x, none):
NOISY_VARIANCE_IN_HALF = 16.0
HOT_FRAME_SIGMAS = 3.0  # and this many sd of one frame's noise above the neighbours, on average
MAX_HOT_FRACTION = 0.02  # more "hot" pixels than this are the sample's own spikes, not a camera's
PATTERN_PLANES = 64  # planes sampled to estimate the fixed pattern
PATTERN_MIN_PLANES = 8  # fewer planes give no estimate of a fixed pattern
PATTERN_SHARE = 0.3  # fixed offsets count as found when the halves agree on this share of the map
LINE_SHARE = 0.3  # line offsets count as found when the two lattices of a line agree on this share
LINE_PLANES = 8  # planes sampled to look for line offsets
LINE_MIN_LENGTH = 256  # pixels along a line: half a line on one lattice is then 64 pixels
# Lines: fewer make the share they agree on too noisy (a 10x256 or 16x256 stack without row offsets
# "found" them, at 41% and 32%).
LINE_MIN_COUNT = 64
LINE_DIRECTIONALITY = 2.0  # and at least this many times the share found across the other direction
LINE_WINDOW = 4  # neighbouring lines on each side whose medians give a line's expected median
# In a stack, a line's structure can be read from the same lines of other planes (a Z-stack's
# structure changes slowly from plane to plane; each plane's line offsets are its own): the levels
# of the lines up to LINE_ACROSS_REACH away, averaged in each plane up to LINE_PLANE_REACH away
# along the context axis, fitted linearly along it. On C2 with dark frames the offsets' error
# variance went from 0.098 to 0.049 and the PSNR from 26.44 to 26.63 dB (planes up to 3 away: the
# same PSNR; lines up to 2 or 6 away: 26.57, 26.62).
LINE_PLANE_REACH = 2
LINE_ACROSS_REACH = 4
LINE_ACROSS_PLANES = 4  # planes sampled to choose between lines across planes and within each
LEVELS_KEPT = 64  # planes' line levels a CorrectedStack keeps (a context of 3 and its planes around, both decisions)
LEVEL_BINS = 16
# A pattern pixel is told from structure by the 11x11 pixels around it. The least-squares kernel
# trades the pattern it smears over its neighbours against the structure it misses; on C2 the map's
# error that a 3x3 mean keeps (what the network takes for structure) was 0.36 with 5x5, 0.31 with
# 9x9, 0.30 with 11x11 (0.19: the planes' noise alone).
PREDICTOR_REACH = 5
PREDICTOR_PIXELS = 2**17  # at most this many pixels fit it (a 121-column design: 127 MB)
PREDICTOR_PIXELS_PER_WEIGHT = 20
# A pixel's 8 lattice neighbours, 2 pixels away: the only neighbours a decision about the pixel
# may read (the network at p sees the pixels off p's lattice; their corrections must not read p).
_LATTICE_RING = np.zeros((5, 5), dtype=bool)
_LATTICE_RING[::2, ::2] = True
_LATTICE_RING[2, 2] = False
# The 8 lattice neighbours of a pixel: 2 pixels away in y, x or both.
_LATTICE_OFFSETS = tuple((dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2) if dy or dx)
# A single image decides its own hot pixels from the ring twice as far out (4 pixels away), which
# never holds a pixel's 8 nearest lattice neighbours: the lattice filter at p reads those, and
# leaves out the far ring's offsets (lattice.FAR_OFFSETS), so no decision it reads holds p. The
# far ring's wider spread of structure needs a higher threshold to find nothing on D1-D6.
FAR_SPACING = 4
HOT_SIGMAS_FAR = 8.0
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
        dark = dark if hasattr(dark, "shape") else np.asarray(dark)
        shape = tuple(dark.shape)
        if axes is not None and len(axes) != len(shape):
            raise BadInput(f"the dark stack has {len(shape)} dimensions but axes {axes!r}; give one letter per axis")
        if len(shape) not in (2, 3):
            raise BadInput(f"a dark stack is (frames, Y, X) or one (Y, X) frame, got shape {shape}; "
                           "give the dark frames of one camera, one channel")

        def frames():  # frame by frame: a long dark stack need not fit in memory
            for index in range(1 if len(shape) == 2 else shape[0]):
                frame = np.asarray(dark if len(shape) == 2 else dark[index], dtype=np.float64)
                if not np.isfinite(frame).all():
                    raise BadInput("the dark stack holds NaN or infinite values; give the camera's raw dark frames")
                yield frame

        count = 1 if len(shape) == 2 else shape[0]
        mean = sum(frames()) / count
        variance = sum((frame - mean) ** 2 for frame in frames()) / (count - 1) if count > 1 else None
        return cls(mean, variance, count)

    def check_fits(self, layout: PlaneLayout) -> None:
        if self.offset.shape != (layout.height, layout.width):
            raise BadInput(f"the dark frames are {self.offset.shape[0]}x{self.offset.shape[1]} pixels but the image "
                           f"is {layout.height}x{layout.width}; use dark frames from the same camera and crop")


@dataclass
class StackPattern:
    """A fixed pattern measured on a stack's own planes, kept as sums over two halves (the
    sampled planes of even and of odd flat index), so that a map without any given planes can
    be made: plane z is corrected with the other half less its context planes, its context
    planes with z's own half less z. The two maps share no plane, so the part of the pattern
    left in each (the planes' noise averaged) differs between the plane and its context, and
    the network cannot take it for structure the way it would a map common to all of them.

    A plane's residual r is the plane (hot pixels replaced by their 8 lattice neighbours' median) less
    its prediction from the pixels around (PREDICTOR_REACH; a least-squares kernel per half and channel):
    smooth structure is predicted away, a white pattern is not. Which pixels are hot is decided
    by each half of the stack (CameraCorrection.hot_halves); a prediction of plane z uses the
    decisions of the half z is not in, so the sums are kept for both halves' decisions."""

    sums: np.ndarray  # (2, 2, C, Y, X): [deciding half, summed half]: the sum of r over the summed half's planes
    planes: tuple[tuple[int, ...], tuple[int, ...]]  # the flat plane indices each half sums
    kernels: np.ndarray  # (2, C, k, k): k = 2 PREDICTOR_REACH + 1 where measured (a saved one keeps its own)
    biases: np.ndarray  # (2, C)
    weights: np.ndarray  # (C,): the share of a map taken out (how much of it the halves agree on)
    usable: np.ndarray  # (2, C, Y, X) bool: not hot, as each half decides

    def residual(self, decision: int, half: int, block: np.ndarray) -> np.ndarray:
        """r of a raw (C, Y, X) plane, with `half`'s kernels and `decision`'s hot pixels."""
        result = np.empty(block.shape)
        for channel, image in enumerate(block.astype(np.float64)):
            image = with_lattice_medians(image, ~self.usable[decision, channel])
            result[channel] = image - correlate(image, self.kernels[half, channel], mode="mirror") - \
                self.biases[half, channel]
        return result

    def map_without(self, decision: int, half: int, left_out: list[np.ndarray]) -> np.ndarray:
        """`half`'s map (with `decision`'s hot pixels) less the planes whose residuals are
        `left_out`: about its mean (the output keeps the input's baseline), weighted."""
        count = len(self.planes[half]) - len(left_out)
        sums = self.sums[decision, half]
        if count < 1:  # a small stack whose context takes every plane of the half: no map to take out
            return np.zeros(sums.shape, dtype=np.float32)
        mean = (sums - sum(left_out, np.zeros_like(sums))) / count
        result = np.empty(mean.shape, dtype=np.float32)
        for channel, image in enumerate(mean):
            result[channel] = self.weights[channel] * (image - image[self.usable[decision, channel]].mean())
        return result

    def maps_for(self, target: int, context: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(the target plane's map, its context planes' map) for predicting plane `target` with
        the raw `context` planes (flat index -> (C, Y, X)) and the raw target in context[target];
        both with the hot pixels the other half decided, which never read the target."""
        own, other = target % 2, 1 - target % 2
        around = [self.residual(other, other, block) for flat, block in context.items()
                  if flat != target and flat in self.planes[other]]
        itself = [self.residual(other, own, context[target])] if target in self.planes[own] else []
        return self.map_without(other, other, around), self.map_without(other, own, itself)

    def whole(self) -> np.ndarray:
        """The map from every sampled plane (for reads that predict nothing)."""
        return (self.map_without(0, 0, []) + self.map_without(1, 1, [])) / 2

    def arrays(self) -> dict[str, np.ndarray]:
        return {"pattern_sums": self.sums, "pattern_kernels": self.kernels, "pattern_biases": self.biases,
                "pattern_weights": self.weights, "pattern_usable": self.usable,
                "pattern_even": np.asarray(self.planes[0], dtype=np.int64),
                "pattern_odd": np.asarray(self.planes[1], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> StackPattern | None:
        if "pattern_sums" not in arrays:
            return None
        planes = (tuple(int(v) for v in arrays["pattern_even"]), tuple(int(v) for v in arrays["pattern_odd"]))
        return cls(arrays["pattern_sums"], planes, arrays["pattern_kernels"], arrays["pattern_biases"],
                   arrays["pattern_weights"], arrays["pattern_usable"])


@dataclass
class CameraCorrection:
    """What is taken out of this data's planes (maps per channel, (C, Y, X), input units)."""

    source: str  # "dark frames" or "detected"
    offset: np.ndarray | None = None  # fixed offsets from dark frames (not from the data)
    pattern: StackPattern | None = None  # fixed offsets measured on the stack itself
    hot: np.ndarray | None = None  # bool: pixels whose value is never used (on a stack: either half's)
    extra_variance: np.ndarray | None = None  # read variance above the typical pixel's
    # (2, C, Y, X) bool, on a stack whose hot pixels were found in the data: each half's decisions.
    # Plane z is predicted with the other half's, which never read z (exactly blind: z's own value
    # cannot make a pixel hot and so change what its context planes show there).
    hot_halves: np.ndarray | None = None
    # (K, C, Y, X) bool, on a few planes whose hot pixels were found one plane at a time: each
    # looked-at plane's decisions (flat indices in looked_at). Plane z is predicted with the pixels
    # hot in every looked-at plane but z.
    hot_looked: np.ndarray | None = None
    looked_at: tuple[int, ...] = ()
    lines: tuple[str, ...] = ()  # "rows", "columns"
    # direction -> share of a line's offset taken out, where it is measured within each plane
    line_weight: dict = field(default_factory=dict)
    # Whether a stack's line offsets are measured against the same lines of the planes around
    # (CorrectedStack._lines_across) rather than within each plane (remove_line_offsets).
    lines_across: bool = False
    found: list[str] = field(default_factory=list)

    def hot_for(self, target: int | None) -> np.ndarray | None:
        """The hot pixels for predicting the plane of flat index `target` (None: a read that
        predicts nothing, which takes every half's)."""
        if target is None:
            return self.hot
        if self.hot_halves is not None:
            return self.hot_halves[1 - target % 2]
        if self.hot_looked is not None and target in self.looked_at and len(self.looked_at) > 1:
            others = [mask for mask, flat in zip(self.hot_looked, self.looked_at) if flat != target]
            found = np.logical_and.reduce(others)
            return found if found.any() else None
        if self.hot_looked is not None and len(self.looked_at) > 1:  # a plane no decision read
            return np.logical_and.reduce(self.hot_looked)
        return self.hot

    @property
    def decided_on_itself(self) -> bool:
        """Whether a single image's hot pixels were decided on the image itself: pixel q's decision
        then read q's far lattice ring (FAR_SPACING), and the lattice filter at p reads q (with
        weight 0 where q is hot) only where that ring does not hold p: a prediction of a single
        image under "auto" leaves the far ring's offsets out of the filter (LatticeFilter.far,
        prediction.as_predicted), by the setting and the layout, not by what it finds: a switch on
        what it finds would itself depend on every pixel's value, p's included."""
        return self.source == "detected" and self.hot is not None and self.hot_halves is None \
            and self.hot_looked is None

    @property
    def blocks_lattice(self) -> bool:
        """Whether a fit leaves the lattice filter (which reads p's own lattice) out. Beside line offsets it
        reads residuals centred along the lines (lattice.centred_residual_features), which is
        blind in any direction; with offsets in both directions, residuals centred along one
        would still carry the other's offsets, which the filter would put back into the output."""
        return len(self.lines) > 1

    def decision_key(self, target: int) -> object:
        """Planes with the same key are predicted with the same hot pixels (hot_for)."""
        if self.hot_halves is not None:
            return 1 - target % 2
        return target if target in self.looked_at else None

    @property
    def per_pixel(self) -> bool:
        """Whether the tile model needs per-pixel maps (pixel_maps) beside the data."""
        return self.hot is not None or self.extra_variance is not None

    @property
    def active(self) -> bool:
        return (self.offset is not None or self.pattern is not None or self.hot is not None or bool(self.lines)
                or self.extra_variance is not None)

    def describe(self) -> str:
        return "; ".join(self.found) if self.found else "no camera pattern found"

    def to_dict(self) -> dict:
        return {"source": self.source, "found": list(self.found), "lines": list(self.lines),
                "lines_across": self.lines_across,
                "hot_pixels": int(self.hot.sum()) if self.hot is not None else 0, "pattern": self.pattern is not None}

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {name: value for name, value in (("offset", self.offset), ("hot", self.hot),
                                                   ("extra_variance", self.extra_variance),
                                                   ("hot_halves", self.hot_halves),
                                                   ("hot_looked", self.hot_looked)) if value is not None}
        return {**arrays, **(self.pattern.arrays() if self.pattern is not None else {})}

    def _description(self) -> dict:
        return {"source": self.source, "lines": list(self.lines), "line_weight": self.line_weight,
                "lines_across": self.lines_across,
                "found": self.found, "looked_at": list(self.looked_at)}

    def digest(self) -> str:
        """A fingerprint of the maps and decisions (a cluster job redoes its blocks when it changes)."""
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps(self._description(), sort_keys=True).encode())
        for name, array in sorted(self._arrays().items()):
            digest.update(name.encode() + np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def save(self, path: Path) -> None:
        """Maps and decisions as .npz (plain arrays and a JSON text: nothing unpickles),
        written beside and renamed into place."""
        import json
        import os

        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as handle:
            np.savez(handle, description=np.array(json.dumps(self._description())), **self._arrays())
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> CameraCorrection:
        import json

        with np.load(path, allow_pickle=False) as stored:
            described = json.loads(str(stored["description"]))
            arrays = {name: stored[name] for name in stored.files if name != "description"}
        return cls(source=described["source"], offset=arrays.get("offset"), pattern=StackPattern.from_arrays(arrays),
                   hot=arrays.get("hot"), extra_variance=arrays.get("extra_variance"),
                   lines=tuple(described["lines"]), line_weight=described["line_weight"], found=described["found"],
                   lines_across=bool(described.get("lines_across", False)),
                   hot_halves=arrays.get("hot_halves"), hot_looked=arrays.get("hot_looked"),
                   looked_at=tuple(described.get("looked_at", ())))

    def correct(self, block: np.ndarray, offset: np.ndarray | None, hot: np.ndarray | None,
                lines: bool | dict = True) -> np.ndarray:
        """A whole (C, Y, X) plane with the camera taken out (`offset`: the fixed offsets for it,
        `hot`: the hot pixels, hot_for the plane predicted), its line offsets too unless not `lines`
        (measured in the plane itself; or given: direction -> (C, 2, lines), each line's offset on
        its even and its odd pixels, or (C, 1, lines) on all of them)."""
        block = block.astype(np.float32, copy=True)
        if offset is not None:
            block -= offset
        if hot is not None:
            for channel in range(len(block)):
                replace_hot(block[channel], hot[min(channel, len(hot) - 1)])
        if isinstance(lines, dict):
            for direction, offsets in lines.items():
                for channel in range(len(block)):
                    target = block[channel] if direction == "rows" else block[channel].T
                    for parity in (0, 1):
                        target[:, parity::2] -= offsets[channel, min(parity, len(offsets[channel]) - 1), :, None]
            return block
        for direction in self.lines if lines else ():
            for channel in range(len(block)):
                remove_line_offsets(block[channel], direction, self.line_weight[direction])
        return block

    def for_pd(self, pd: int) -> CameraCorrection:
        """This correction for a network of pixel-shuffle factor `pd`: beyond 1 its blind
        spot is p + 2 pd Z^2, which no longer holds the lattice neighbours that hot-pixel
        values and line offsets are taken from, so those are left in (said in `found`)."""
        if pd == 1 or (self.hot is None and not self.lines):
            return self
        return dataclasses.replace(self, hot=None, hot_halves=None, hot_looked=None, looked_at=(), lines=(),
                                   line_weight={}, lines_across=False, found=[*self.found, (
            f"with pd {pd} (spatially correlated noise) hot pixels and line offsets stay in: taking them out "
            "would show each pixel its own value through its neighbours")])

    def any_offset(self) -> np.ndarray | None:
        """The fixed offsets for a read that predicts nothing (analysis, line detection)."""
        return self.offset if self.pattern is None else self.pattern.whole()

    def pixel_maps(self, channels: int, target: int | None) -> np.ndarray:
        """(2C, Y, X) float32 for the tile model predicting the plane of flat index `target`: 1
        where a pixel's value is never used, then its read variance above the typical pixel's
        (input units)."""
        def widened(maps: np.ndarray) -> np.ndarray:
            return np.broadcast_to(maps, (channels, *maps.shape[1:]))

        hot = self.hot_for(target)
        shape = (self.hot if self.hot is not None else self.extra_variance).shape[1:]
        hot = hot if hot is not None else np.zeros((1, *shape), dtype=bool)
        extra = self.extra_variance if self.extra_variance is not None else np.zeros((1, *shape), dtype=np.float32)
        return np.concatenate([widened(hot).astype(np.float32), widened(extra).astype(np.float32)])


class CorrectedStack(PlaneSource):
    """`data` read plane by plane with the camera taken out (a read-only view). Whole planes
    are read (line offsets need whole lines), and a region cut from them."""

    def __init__(self, data, layout: PlaneLayout, correction: CameraCorrection) -> None:
        self.source, self.layout, self.correction = data, layout, correction
        self.base = data  # image_io.release_pages follows it to a memory-mapped input
        self.shape, self.dtype, self.ndim = tuple(data.shape), np.dtype(np.float32), len(data.shape)
        self._last = None  # (plane, planes each side), _decisions' result
        self._levels: dict = {}  # (plane, decisions) -> direction -> (C, 3, lines): line_levels
        self._half_maps: dict = {}  # half of the stack -> its whole fixed-offset map (a pattern's)

    def _cut(self, block: np.ndarray, offset: np.ndarray | None, hot: np.ndarray | None,
             region: Region | None, lines: bool | dict = True) -> np.ndarray:
        corrected = self.correction.correct(block, offset, hot, lines)
        return corrected if region is None else np.ascontiguousarray(corrected[(slice(None), *region)])

    def read_plane(self, plane: tuple[int, ...], region: Region | None = None) -> np.ndarray:
        """A plane for a read that predicts nothing (the noise analysis, the normalisation): its
        line offsets are measured within the plane, also where a prediction measures them
        against the planes around (both take out nearly all of them)."""
        return self._cut(self.layout.read_plane(self.source, plane), self.correction.any_offset(),
                         self.correction.hot_for(None), region)

    def _with_decisions(self, plane: tuple[int, ...], planes_each_side: int):
        """The raw plane and its context planes (by flat index), the fixed offsets for the plane
        and for its context, and the hot pixels for predicting the plane: the last plane's kept,
        as a prediction reads it again (by tile, and before its line offsets came out)."""
        key = (tuple(plane), planes_each_side)
        if self._last is None or self._last[0] != key:
            self._last = key, self._decisions(plane, planes_each_side)
        return self._last[1]

    def _decisions(self, plane: tuple[int, ...], planes_each_side: int):
        planes = [plane, *self.layout.context_planes(plane, planes_each_side)]
        raw = {self.layout.flat_index(each): self.layout.read_plane(self.source, each) for each in planes}
        target = self.layout.flat_index(plane)
        if self.correction.pattern is not None:
            target_offset, context_offset = self.correction.pattern.maps_for(target, raw)
        else:
            target_offset = context_offset = self.correction.offset
        hot = self.correction.hot_for(target)  # the same decisions for the plane and its context
        lines = {flat: True for flat in raw}
        if self.correction.lines and self.correction.lines_across:
            lines = self._lines_across(target, raw)
        return planes, raw, target_offset, context_offset, hot, lines

    def _line_levels(self, flat: int, target: int, raw: dict) -> dict:
        """line_levels of plane `flat` (channel by channel; direction -> (C, 3, lines)) with
        fixed offsets and hot pixels that never read plane `target` taken out (the plane read
        from `raw`, flat index -> raw plane, where it is there)."""
        key = (flat, self.correction.decision_key(target), target % 2 if self.correction.pattern is not None else None)
        if key not in self._levels:
            offset = self._half_map(1 - target % 2) if self.correction.pattern is not None else self.correction.offset
            block = raw[flat] if flat in raw else self.layout.read_plane(self.source, self.layout.plane_index(flat))
            block = self.correction.correct(block, offset, self.correction.hot_for(target), lines=False)
            if len(self._levels) >= LEVELS_KEPT:
                self._levels.pop(next(iter(self._levels)))
            self._levels[key] = {direction: np.stack([line_levels(image, direction) for image in block])
                                 for direction in self.correction.lines}
        return self._levels[key]

    def _half_map(self, half: int) -> np.ndarray:
        """The whole map of one half of the stack, with its own hot-pixel decisions (made once)."""
        if half not in self._half_maps:
            self._half_maps[half] = self.correction.pattern.map_without(half, half, [])
        return self._half_maps[half]

    def _around(self, flat: int, excluded: set[int]) -> list[tuple[int, int]]:
        """(step, flat index) of the planes up to LINE_PLANE_REACH along the context axis from
        plane `flat`, but `excluded` ones."""
        layout = self.layout
        plane = layout.plane_index(flat)
        position = layout.plane_axes.index(layout.axes.index(layout.context_axis))
        around = []
        for step in range(-LINE_PLANE_REACH, LINE_PLANE_REACH + 1):
            index = plane[position] + step
            if step and 0 <= index < layout.context_length():
                other = layout.flat_index(plane[:position] + (index,) + plane[position + 1:])
                if other not in excluded:
                    around.append((step, other))
        return around

    def _lines_across(self, target: int, raw: dict) -> dict[int, dict | bool]:
        """The line offsets of each plane read to predict plane `target` (`raw`: flat index ->
        raw plane): each line's level (on the target plane over the line's own lattice, on a
        context plane over the whole line) less the level its structure gives it there, fitted
        to the planes around but the target (_fitted; each plane's line offsets are its own and
        average away). True where no plane is around (the plane's own lines then give the
        offsets). Measured this way, a line's offset is taken out whole (line_weight is for the
        estimate within a plane, whose error shares more with the offset's neighbours)."""
        result = {}
        for flat in raw:
            fitted = self._fitted(flat, {flat, target}, target, raw)
            if fitted is None:
                result[flat] = True
                continue
            own = self._line_levels(flat, target, raw)
            result[flat] = {direction: (own[direction][:, 1:] if flat == target else own[direction][:, :1])
                            - fitted[direction][:, None] for direction in self.correction.lines}
        return result

    def _fitted(self, flat: int, excluded: set[int], target: int, raw: dict) -> dict | None:
        """direction -> (C, lines): the whole-line levels of plane `flat` as the planes around
        it but `excluded` give them (see _plane_weights), each plane's levels first averaged over
        the lines up to LINE_ACROSS_REACH away (their offsets are independent; structure
        changes little over a few lines). None where no plane is around."""
        around = self._around(flat, excluded)
        if not around:
            return None
        weights = _plane_weights(tuple(step for step, _ in around))
        return {direction: sum(weight * uniform_filter1d(self._line_levels(other, target, raw)[direction][:, 0],
                                                         2 * LINE_ACROSS_REACH + 1, axis=1, mode="mirror")
                               for (_, other), weight in zip(around, weights))
                for direction in self.correction.lines}

    def read_plane_with_context(self, plane: tuple[int, ...], planes_each_side: int,
                                region: Region | None = None) -> np.ndarray:
        planes, raw, target_offset, context_offset, hot, lines = self._with_decisions(plane, planes_each_side)
        flat = self.layout.flat_index
        blocks = [self._cut(raw[flat(plane)], target_offset, hot, region, lines[flat(plane)])]
        blocks += [self._cut(raw[flat(each)], context_offset, hot, region, lines[flat(each)]) for each in planes[1:]]
        return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]

    def read_plane_without_lines(self, plane: tuple[int, ...], planes_each_side: int) -> np.ndarray:
        """The plane (C, Y, X) as read_plane_with_context gives it, but with its line offsets
        still in (what a lattice filter centred along the lines reads)."""
        _, raw, target_offset, _, hot, _ = self._with_decisions(plane, planes_each_side)
        return self.correction.correct(raw[self.layout.flat_index(plane)], target_offset, hot, lines=False)


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


def line_levels(image: np.ndarray, direction: str) -> np.ndarray:
    """(3, lines): each line's (row's or column's) level over the whole line, then over its even
    and its odd pixels (the two lattices it crosses). A level is the mean of the middle half of
    the values: a bright object crossing part of the line moves it little, and it is steadier
    than the median."""
    source = (image if direction == "rows" else image.T).astype(np.float64)
    return np.stack([_middle_mean(source), _middle_mean(source[:, 0::2]), _middle_mean(source[:, 1::2])])


def _middle_mean(values: np.ndarray) -> np.ndarray:
    """The mean of the middle half of each row of `values`."""
    count = values.shape[1]
    quarter = count // 4
    return np.sort(values, axis=1)[:, quarter: count - quarter].mean(axis=1)


def _plane_weights(steps: tuple[int, ...]) -> np.ndarray:
    """Weights of the planes `steps` away that give a line's level at the plane itself: a fit
    linear along the stack where planes lie on both sides; their mean where they lie on one
    side only (a stack's first and last planes), since extrapolated along the stack the planes'
    noise and offsets would weigh several times more. (A fit also linear along the lines, over
    lines lying symmetrically around the line, gives the same value as their mean.)"""
    if min(steps) < 0 < max(steps):
        return np.linalg.pinv(np.array([[1.0, step] for step in steps]))[0]
    return np.full(len(steps), 1.0 / len(steps))


def remove_line_offsets(image: np.ndarray, direction: str, weight: float) -> None:
    """Subtract `weight` times each line's offset, per lattice, from the (Y, X) `image`."""
    profiles = line_profile(image, direction)
    target = image if direction == "rows" else image.T  # a view: writes reach `image`
    for a, b in _LATTICES:
        lattice = target[a::2, b::2]
        lattice -= (weight * profiles[a, b, : lattice.shape[0]])[:, None].astype(np.float32)


def with_lattice_medians(image: np.ndarray, where: np.ndarray) -> np.ndarray:
    """`image` with lattice_median's value in place of each pixel `where` is True, computed at
    those pixels only (a plane's few hot pixels need not cost a median filter of the plane)."""
    if not where.any():
        return image
    ys, xs = np.nonzero(where)
    padded = np.pad(image, 2, mode="reflect")  # scipy's "mirror"
    values = np.stack([padded[ys + 2 + dy, xs + 2 + dx] for dy, dx in _LATTICE_OFFSETS])
    result = image.copy()
    result[ys, xs] = np.partition(values, 4, axis=0)[4]  # median_filter's median of 8: the 5th smallest
    return result


# A sorting network for 8 values (19 compare-exchanges): after it, slot k holds the k-th smallest.
_SORT_8 = ((0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7), (0, 1), (2, 3), (4, 5), (6, 7),
           (2, 4), (3, 5), (1, 4), (3, 6), (1, 2), (3, 4), (5, 6))
_STRIP_ROWS = 256  # rows per strip: 8 neighbour images of a strip, not of the whole plane, in memory at once


def _over_lattice_neighbours(image: np.ndarray, statistic) -> np.ndarray:
    """`statistic` of each pixel's 8 lattice neighbours (mirrored at the edges, which keeps the
    lattice: scipy's "mirror", numpy's "reflect"), computed strip by strip. `statistic` takes
    the 8 neighbour images of a strip (read-only views) and returns the strip's result."""
    padded = np.pad(image, 2, mode="reflect")
    height, width = image.shape
    result = np.empty_like(image)
    for top in range(0, height, _STRIP_ROWS):
        bottom = min(top + _STRIP_ROWS, height)
        result[top:bottom] = statistic([padded[2 + dy + top: 2 + dy + bottom, 2 + dx: 2 + dx + width]
                                        for dy, dx in _LATTICE_OFFSETS])
    return result


def _fifth_smallest(values: list[np.ndarray]) -> np.ndarray:
    values = list(values)
    for low, high in _SORT_8:  # new arrays each step: the inputs are views of the padded plane
        values[low], values[high] = np.minimum(values[low], values[high]), np.maximum(values[low], values[high])
    return values[4]


def _second_largest(values: list[np.ndarray]) -> np.ndarray:
    first, second = np.maximum(values[0], values[1]), np.minimum(values[0], values[1])
    for value in values[2:]:
        np.maximum(second, np.minimum(first, value), out=second)
        np.maximum(first, value, out=first)
    return second


def _on_each_lattice(image: np.ndarray, spacing: int, statistic) -> np.ndarray:
    """`statistic` (a function of an image) with its ring `spacing` pixels away: for the far ring
    (4), the nearest ring (2) of each of the four lattices as an image of its own. Mirrored at the
    edges there, a neighbour past the edge is the pixel itself or one 4 pixels away, never one 2
    pixels away (as mirroring the whole image by 4 would give)."""
    if spacing == 2:
        return statistic(image)
    result = np.empty_like(image)
    for a, b in _LATTICES:
        result[a::2, b::2] = statistic(np.ascontiguousarray(image[a::2, b::2]))
    return result


def lattice_median(image: np.ndarray, spacing: int = 2) -> np.ndarray:
    """The median of each pixel's 8 lattice neighbours (`spacing` pixels away: 2 or 4) as scipy's
    median_filter takes it (the 5th smallest), by a sorting network over whole image strips:
    the same values, several times faster than the filter's per-pixel selection on a megapixel
    plane."""
    def nearest(plane: np.ndarray) -> np.ndarray:
        if min(plane.shape) < 3:  # too small to mirror twice by padding
            from scipy.ndimage import median_filter

            return median_filter(plane, footprint=_LATTICE_RING, mode="mirror")
        return _over_lattice_neighbours(plane, _fifth_smallest)

    return _on_each_lattice(image, spacing, nearest)


def second_brightest_neighbour(image: np.ndarray, spacing: int = 2) -> np.ndarray:
    """The second largest of each pixel's 8 lattice neighbours `spacing` pixels away (2 or 4;
    scipy's rank_filter(image, -2) on that ring), by a running top two."""
    def nearest(plane: np.ndarray) -> np.ndarray:
        if min(plane.shape) < 3:
            from scipy.ndimage import rank_filter

            return rank_filter(plane, -2, footprint=_LATTICE_RING, mode="mirror")
        return _over_lattice_neighbours(plane, _second_largest)

    return _on_each_lattice(image, spacing, nearest)


def _robust_sigma(values: np.ndarray) -> float:
    """MAD-based sd; where counts are so low that most values tie (MAD 0), the mean absolute
    deviation's instead (a sd of 0 would make every small excess 'hot')."""
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0
    deviation = np.abs(values - np.median(values))
    mad = float(np.median(deviation))
    return MAD_TO_SIGMA * mad if mad > 0 else MEAN_DEVIATION_TO_SIGMA * float(deviation.mean())


def _binned(level: np.ndarray, values: np.ndarray, statistic) -> np.ndarray:
    """Per pixel, `statistic` of `values` among pixels of a similar `level` (equal-count bins)."""
    order = np.argsort(level, axis=None, kind="stable")
    result = np.empty(level.size)
    for part in np.array_split(order, LEVEL_BINS):
        result[part] = statistic(values.ravel()[part])
    return result.reshape(level.shape)


def decides_on_itself(setting, layout: PlaneLayout) -> bool:
    """Whether the camera `setting` ("auto", "off" or a Calibration) makes an image of this layout
    decide its own hot pixels (a single plane: detect_hot_pixels, from the far ring), whatever
    it finds."""
    return isinstance(setting, str) and setting == "auto" and layout.plane_count == 1


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
    """A dark calibration's offsets (less the usable pixels' mean, so that the output keeps the
    input's baseline; from one frame, the mean of those not far above the rest),
    per-pixel read variance, and unusable pixels (read variance NOISY_VARIANCE times the
    typical one: hot pixels' dark current, the read noise's far tail)."""
    calibration.check_fits(layout)
    if calibration.variance is not None:
        typical = float(np.median(calibration.variance))
        if typical <= 0:  # quantised dark frames where most pixels never change: a 0 would make any variance "hot"
            typical = float(np.mean(calibration.variance))
        hot = calibration.variance > NOISY_VARIANCE * typical
    else:  # one frame: no variance, so hot pixels are told by their offset alone (for the baseline only)
        deviation = calibration.offset - np.median(calibration.offset)
        hot = deviation > HOT_SIGMAS * _robust_sigma(calibration.offset)
    # About the usable pixels' mean: a hot pixel's dark current must not shift the whole output.
    level = calibration.offset[~hot].mean()
    offset = (calibration.offset - level).astype(np.float32)[np.newaxis]
    correction = CameraCorrection("dark frames", offset=offset)
    correction.found.append(f"fixed offsets from {calibration.frames} dark frame(s) (sd {_robust_sigma(offset):.3g})")
    if calibration.variance is not None:
        correction.hot = hot[np.newaxis] if hot.any() else None
        correction.extra_variance = np.where(hot, 0.0, calibration.variance - typical).astype(np.float32)[np.newaxis]
        correction.found.append(f"per-pixel read variance (typical {typical:.3g}); {int(hot.sum())} hot or very "
                                "noisy pixel(s) never used")
    return correction


def detect_pattern(data, layout: PlaneLayout) -> CameraCorrection:
    """Fixed offsets, hot and very noisy pixels of a stack, from up to PATTERN_PLANES planes.
    Hot: a pixel far above its 8 lattice neighbours' median on average over the planes, or whose
    difference to them varies far more than other pixels' at its level. The offsets: see
    StackPattern. Halves of the stack agree on the pattern (and on whatever structure the
    prediction from around leaves), not on the noise: the share they agree on decides and
    weights the map."""
    if not predictor_reach(layout.height, layout.width):  # too few pixels to tell a pattern from structure
        return detect_hot_pixels(data, layout)
    sums, level, planes = _residual_sums(data, layout)
    if min(len(half) for half in planes) < PATTERN_MIN_PLANES // 2:  # halves this thin give no estimate
        return detect_hot_pixels(data, layout)
    correction = CameraCorrection("detected")
    # Each half decides its hot pixels from its own planes (a plane is predicted with the other's),
    # and each half's decisions stand or fall (too many) on their own.
    halves_hot = np.stack([_gated(_hot_in_half(sums[half], len(planes[half])), correction) for half in (0, 1)])
    hot = halves_hot[0] | halves_hot[1]
    if hot.any():
        correction.hot, correction.hot_halves = hot, halves_hot
        correction.found.append(f"{int(hot.sum())} hot or very noisy pixel(s) (the same in every plane): replaced "
                                "by their neighbours' median and never used as data")
    usable = ~halves_hot
    pattern = _stack_pattern(sums, planes, usable, None)
    # Each half's map as the other half's planes are corrected with it (with that half's decisions).
    halves = [pattern.map_without(1 - half, half, []) for half in (0, 1)]
    both = usable[0] & usable[1]
    shares = [_agreement(halves[0][c][both[c]], halves[1][c][both[c]]) for c in range(layout.channels)]
    if min(shares) > PATTERN_SHARE:
        correction.pattern = dataclasses.replace(pattern, weights=np.asarray(shares))
        # What stays of the pattern in a plane is the other half's noise, averaged: the halves'
        # difference has twice its variance. The quality estimate and the lattice filter's
        # weights count it as noise of the pixel.
        weights = np.asarray(shares).reshape(-1, 1, 1)
        disagreement = np.stack([_binned(level[c], (halves[0][c] - halves[1][c]) ** 2, np.mean)
                                 for c in range(layout.channels)])
        correction.extra_variance = (weights**2 * disagreement / 2).astype(np.float32)
        correction.found.append(f"fixed offsets (the same in every plane; sd {_robust_sigma(halves[0]):.3g}, "
                                f"{min(shares):.0%} of them repeat between halves of the stack): taken out; the "
                                "output is the blind-spot mean, as a pixel's own offset is known only to the planes' "
                                "noise averaged (dark frames give the posterior back)")
    return correction


def _hot_in_half(sums: np.ndarray, count: int) -> np.ndarray:
    """(C, Y, X) bool: the hot and very noisy pixels one half's sums show. Hot: far above the
    map's spread and above a frame's own noise (static fine structure also stands out of a map
    averaged over many planes, but not out of one frame's noise); very noisy: a difference to
    the neighbours that varies NOISY_VARIANCE_IN_HALF times more than at a typical pixel of its
    level (a half's few planes make the variance noisier than all of them would)."""
    mean = sums[0] / count
    variance = np.maximum(sums[1] / count - mean**2, 0)
    level = (sums[2] - sums[0]) / count  # the half's own mean neighbour median: nothing of the other half
    hot = np.zeros(mean.shape, dtype=bool)
    for channel in range(len(mean)):
        typical = _binned(level[channel], variance[channel], np.median)  # the noise variance of a typical pixel
        if not typical.all():  # few low-count planes: a median of 0 would make any variance "very noisy"
            typical = np.where(typical > 0, typical, _binned(level[channel], variance[channel], np.mean))
        excess = mean[channel] - np.median(mean[channel])
        high = (excess > HOT_SIGMAS * _robust_sigma(mean[channel])) & (excess > HOT_FRAME_SIGMAS * np.sqrt(typical))
        hot[channel] = high | (variance[channel] > NOISY_VARIANCE_IN_HALF * typical)
    return hot


def _residual_sums(data, layout: PlaneLayout) -> tuple[np.ndarray, np.ndarray, tuple[tuple, tuple]]:
    """Over up to PATTERN_PLANES planes, by the parity of the plane's flat index: sums of each
    pixel's difference d to the median of its 8 lattice neighbours (2 pixels away), of d^2 and of the pixel itself
    ((2, 3, C, Y, X)); the mean neighbour median (C, Y, X); the flat indices of each parity."""
    sums = np.zeros((2, 3, layout.channels, layout.height, layout.width))
    level = np.zeros((layout.channels, layout.height, layout.width))
    planes: tuple[list[int], list[int]] = ([], [])
    for flat in _sampled_planes(layout.plane_count):
        plane = layout.plane_index(flat)
        block = layout.read_plane(data, plane)
        check_finite(block, f"{layout.describe_plane(plane)} of the input")
        block = block.astype(np.float64)
        parity = flat % 2
        for channel, image in enumerate(block):
            neighbours = lattice_median(image)
            difference = image - neighbours
            sums[parity, 0, channel] += difference
            sums[parity, 1, channel] += difference**2
            sums[parity, 2, channel] += image
            level[channel] += neighbours
        planes[parity].append(flat)
    return sums, level / max(len(planes[0]) + len(planes[1]), 1), (tuple(planes[0]), tuple(planes[1]))


def _sampled_planes(count: int) -> list[int]:
    """Up to PATTERN_PLANES flat plane indices, half of them even and half odd, each half
    spread evenly over the stack."""
    picks = []
    for parity in (0, 1):
        candidates = np.arange(parity, count, 2)
        chosen = np.linspace(0, len(candidates) - 1, min(len(candidates), PATTERN_PLANES // 2)).round().astype(int)
        picks += [int(candidates[i]) for i in np.unique(chosen)] if len(candidates) else []
    return sorted(picks)


def _stack_pattern(sums: np.ndarray, planes: tuple[tuple, tuple], usable: np.ndarray,
                   fitted: StackPattern | None) -> StackPattern:
    """The StackPattern of these sums: each half's residual sums (its planes with hot pixels
    replaced, as each half decides (`usable`, (2, C, Y, X)), less their prediction from around),
    with the prediction kernels fitted on the half's mean, or `fitted`'s (a remeasurement keeps
    its decisions)."""
    channels = usable.shape[1]
    residual_sums = np.empty((2, 2, *usable.shape[1:]))
    size = fitted.kernels.shape[-1] if fitted is not None else 2 * PREDICTOR_REACH + 1  # a saved correction's own
    kernels = np.empty((2, channels, size, size))
    biases = np.empty((2, channels))
    for half in (0, 1):
        count = len(planes[half])
        for decision in (half, 1 - half):  # the half's own decisions first: its kernels are fitted with them
            # A hot pixel's sum of values less its sum of differences is its sum of neighbour medians.
            replaced = np.where(usable[decision], sums[half, 2], sums[half, 2] - sums[half, 0])
            for channel in range(channels):
                if decision == half:
                    kernels[half, channel], biases[half, channel] = (
                        (fitted.kernels[half, channel], fitted.biases[half, channel]) if fitted is not None
                        else _neighbour_predictor(replaced[channel] / count, usable[decision, channel]))
                predicted = correlate(replaced[channel], kernels[half, channel], mode="mirror")
                residual_sums[decision, half, channel] = replaced[channel] - predicted - count * biases[half, channel]
    weights = fitted.weights if fitted is not None else np.ones(channels)
    return StackPattern(residual_sums, planes, kernels, biases, weights, usable)


def predictor_reach(height: int, width: int) -> int:
    """The reach of the kernel that tells a pattern pixel from structure in planes of this size:
    PREDICTOR_REACH, or less where the pixels away from the edges number fewer than
    PREDICTOR_PIXELS_PER_WEIGHT per weight; 0 where not even a 3x3 kernel fits so (no pattern is
    measured)."""
    for reach in range(PREDICTOR_REACH, 0, -1):
        if (height - 2 * reach) * (width - 2 * reach) >= PREDICTOR_PIXELS_PER_WEIGHT * (2 * reach + 1) ** 2:
            return reach
    return 0


def _neighbour_predictor(image: np.ndarray, usable: np.ndarray) -> tuple[np.ndarray, float]:
    """The (2 PREDICTOR_REACH + 1)^2 kernel (centre 0) and bias that best predict each pixel from
    the pixels around it (least squares over up to PREDICTOR_PIXELS usable pixels away from the
    edges). A thin image fits a smaller kernel (zeros outside it): at least PREDICTOR_PIXELS_PER_WEIGHT
    pixels per weight, or the kernel would reproduce the image, structure and all."""
    height, width = image.shape
    reach = predictor_reach(height, width)
    offsets = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1) if dy or dx]
    step = max(1, math.ceil(math.sqrt((height - 2 * reach) * (width - 2 * reach) / PREDICTOR_PIXELS)))
    rows, columns = slice(reach, height - reach, step), slice(reach, width - reach, step)
    keep = usable[rows, columns].ravel()
    design = np.empty((int(keep.sum()), len(offsets) + 1))  # filled column by column: one copy of the pixels
    for column, (dy, dx) in enumerate(offsets):
        design[:, column] = image[rows.start + dy : rows.stop + dy : step,
                                  columns.start + dx : columns.stop + dx : step].ravel()[keep]
    design[:, -1] = 1.0
    weights = np.linalg.lstsq(design, image[rows, columns].ravel()[keep], rcond=None)[0]
    kernel = np.zeros((2 * PREDICTOR_REACH + 1,) * 2)
    for (dy, dx), weight in zip(offsets, weights[:-1]):
        kernel[PREDICTOR_REACH + dy, PREDICTOR_REACH + dx] = weight
    return kernel, float(weights[-1])


def remeasured(correction: CameraCorrection, data, layout: PlaneLayout) -> CameraCorrection:
    """`correction` with its fixed pattern summed again over `data`'s planes, its decisions
    (hot pixels, weights, prediction kernels, line offsets) kept: what a blindness test
    perturbs. The decisions are statistics of the whole stack, like the normalisation; every
    per-pixel value is exactly blind."""
    if correction.pattern is None:
        return correction
    sums, _, planes = _residual_sums(data, layout)
    pattern = _stack_pattern(sums, planes, correction.pattern.usable, correction.pattern)
    return dataclasses.replace(correction, pattern=pattern)


def detect_hot_pixels(data, layout: PlaneLayout) -> CameraCorrection:
    """Hot pixels of a single image (or a few planes): pixels HOT_SIGMAS_IN_PLANE noise sd above
    the second brightest of their 8 lattice neighbours (the noise sd of pixels at a similar
    level; a single image: HOT_SIGMAS_FAR above those 4 pixels away), decided plane by plane on up to 4
    planes. A plane is predicted with the pixels hot in every other plane looked at (hot_for),
    so its own values decide nothing for it; a single image decides for itself (a hot pixel's
    own output is then the blind-spot mean, which never reads it)."""
    correction = CameraCorrection("detected")
    looked = layout.evenly_spaced(4)
    # A single image decides on itself, from the far ring (FAR_SPACING).
    spacing, sigmas = (FAR_SPACING, HOT_SIGMAS_FAR) if len(looked) == 1 else (2, HOT_SIGMAS_IN_PLANE)
    decisions = []
    for plane in looked:
        block = layout.read_plane(data, plane)
        check_finite(block, f"{layout.describe_plane(plane)} of the input")
        block = block.astype(np.float64)
        found = np.zeros(block.shape, dtype=bool)
        for channel, image in enumerate(block):
            neighbours = lattice_median(image, spacing)
            sigma = _binned(neighbours, image - neighbours, _robust_sigma)
            second = second_brightest_neighbour(image, spacing)
            found[channel] = image - second > sigmas * sigma
        decisions.append(found)
    if len(decisions) == 1:  # a single image decides on itself (CameraCorrection.decided_on_itself)
        correction.hot = _gated(decisions[0], correction)
    else:
        # Each plane's decisions stand or fall (too many) on their own; plane z is predicted with
        # the pixels hot in every other looked-at plane, so no value of z decides anything for it.
        decisions = [_gated(found, correction) for found in decisions]
        correction.hot = np.logical_or.reduce(decisions)
        correction.hot_looked = np.stack(decisions)
        correction.looked_at = tuple(layout.flat_index(plane) for plane in looked)
    if correction.hot.any():
        correction.found.append(f"{int(correction.hot.sum())} hot pixel(s): replaced by their neighbours' median "
                                "and never used as data")
    else:
        correction.hot = correction.hot_looked = None
        correction.looked_at = ()
    return correction


def _gated(hot: np.ndarray, correction: CameraCorrection) -> np.ndarray:
    """One set of decisions, or none of them (all False, and said) where they are too many to be
    a camera's."""
    if hot.mean() > MAX_HOT_FRACTION:
        correction.found.append(f"{int(hot.sum())} isolated bright pixels ({hot.mean():.2%}) kept as they are: too "
                                "many for a camera's hot pixels")
        return np.zeros_like(hot)
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
    measured = {"rows": 0.0, "columns": 0.0}
    offset = correction.any_offset()  # the same for every plane read here (a stack's whole map)
    for direction in ("rows", "columns"):
        length, count = (layout.width, layout.height) if direction == "rows" else (layout.height, layout.width)
        if length < LINE_MIN_LENGTH or count < LINE_MIN_COUNT:
            continue  # short lines: structure spanning both halves agrees as offsets would; few: a noisy share
        shares = []
        for plane in layout.evenly_spaced(LINE_PLANES):
            block = layout.read_plane(data, plane)
            check_finite(block, f"{layout.describe_plane(plane)} of the input")
            for image in correction.correct(block, offset, correction.hot_for(None)).astype(np.float64):
                image = image if direction == "rows" else image.T
                half = image.shape[1] // 2
                left, right = (line_profile(part, "rows") for part in (image[:, :half], image[:, half:]))
                shares += [_agreement(left[a, b], right[a, b]) for a, b in _LATTICES]
        measured[direction] = float(np.median(shares))
    for direction, other in (("rows", "columns"), ("columns", "rows")):
        share = measured[direction]
        # Structure that spans both halves of a line agrees too, but in both directions alike;
        # offsets belong to one direction.
        if share > LINE_SHARE and share > LINE_DIRECTIONALITY * max(measured[other], 0.0):
            correction.lines += (direction,)
            # A half line's profile has twice the noise variance of the whole line's.
            correction.line_weight[direction] = min(share / (share + (1 - share) / 2), 1.0)
            correction.found.append(f"offsets common to whole {direction} of a frame ({share:.0%} of the {direction}' "
                                    f"profile): taken out, each {direction[:-1]} by its own lattice")
    if correction.lines and layout.context_axis is not None:
        _choose_lines_across(data, layout, correction)


def _choose_lines_across(data, layout: PlaneLayout, correction: CameraCorrection) -> None:
    """Measure a stack's line offsets against the planes around where those estimates vary
    less than the ones within each plane, on a few planes. Both hold the offsets themselves;
    the rest is their error (noise, and structure the estimate took for an offset)."""
    stack = CorrectedStack(data, layout, dataclasses.replace(correction, lines_across=True))
    offset = correction.any_offset()
    across, within = [], []
    for plane in layout.evenly_spaced(LINE_ACROSS_PLANES):
        target, raw = layout.flat_index(plane), layout.read_plane(data, plane)
        measured = stack._lines_across(target, {target: raw})[target]
        if measured is True:
            continue
        block = correction.correct(raw, offset, correction.hot_for(target), lines=False)
        for direction in correction.lines:
            across.append(float(np.var(measured[direction])))
            within.append(float(np.mean([np.var(line_profile(image, direction)) for image in block])))
    if across and np.mean(across) < np.mean(within):
        correction.lines_across = True
        correction.found.append(f"line offsets measured against the same lines of the planes around (their estimates "
                                f"vary {np.mean(across) / np.mean(within):.0%} as much as within each plane)")


def camera_record(setting, corrections: CameraCorrection | None | list[CameraCorrection | None]) -> dict:
    """What a model file says of the camera: how it was handled and what was found (in any of
    the images fitted together)."""
    mode = "off" if setting == "off" else "dark frames" if isinstance(setting, Calibration) else "auto"
    if not isinstance(corrections, list):
        corrections = [corrections]
    found = [correction.to_dict() for correction in corrections if correction is not None]
    if not found:
        return {"mode": mode, "found": []}
    record = dict(found[0])
    record["found"] = list(dict.fromkeys(text for each in found for text in each["found"]))
    record["pattern"] = any(each["pattern"] for each in found)
    record["lines_across"] = any(each["lines_across"] for each in found)
    record["hot_pixels"] = sum(each["hot_pixels"] for each in found)
    return {"mode": mode, **record}
