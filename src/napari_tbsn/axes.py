"""Axis letters (STCZYX): parse, validate, guess, and cut a stack into 2D planes.

The network is 2D over Y and X; C is its channels; every S, T and Z index is one plane.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import BadInput

AXIS_LETTERS = "STCZYX"
CONTEXT_AXES = "ZT"  # where neighbouring planes show the same structures: depth first, then time
Region = tuple[slice, slice]  # rows and columns of a plane


def parse_axes(axes: str, ndim: int) -> str:
    """Validate `axes` for an array of `ndim` dimensions; return it in upper case."""
    if not isinstance(axes, str):
        raise BadInput(f"axes must be a string such as 'ZYX', got {type(axes).__name__}")
    letters = axes.strip().upper()
    unknown = sorted(set(letters) - set(AXIS_LETTERS))
    if unknown:
        raise ValueError(
            f"axes {axes!r} has unknown letters {unknown}; use only {', '.join(AXIS_LETTERS)} "
            "(S sample, T time, C channel, Z depth, Y, X)"
        )
    repeated = sorted({a for a in letters if letters.count(a) > 1})
    if repeated:
        raise ValueError(f"axes {axes!r} repeats {repeated}; name each axis once")
    if "Y" not in letters or "X" not in letters:
        raise ValueError(f"axes {axes!r} must contain both Y and X (the image plane)")
    if len(letters) != ndim:
        raise ValueError(
            f"axes {axes!r} names {len(letters)} axes but the data has {ndim} dimensions; "
            f"give one letter per dimension, e.g. {guess_axes((1,) * ndim)!r}"
        )
    return letters


def check_array(data) -> None:
    """Reject what cannot be denoised, where it enters, with the fix in the message."""
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        raise BadInput(f"expected an array (numpy, dask, zarr, memmap), got {type(data).__name__}")
    dtype = np.dtype(data.dtype)
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise BadInput(f"cannot denoise data of dtype {dtype}; convert it to a real-valued type first, "
                        "e.g. data.astype(numpy.float32)")
    shape = tuple(int(s) for s in data.shape)
    if len(shape) < 2:
        raise ValueError(f"expected at least a 2D image, got shape {shape}")
    if 0 in shape:
        raise ValueError(f"the data is empty (shape {shape}): it has no planes or pixels to denoise")


def guess_axes(shape: tuple[int, ...], rgb: bool = False) -> str:
    """A sensible default for data with no axis metadata (napari's conventions)."""
    ndim = len(shape)
    if rgb:
        return {3: "YXC", 4: "ZYXC", 5: "TZYXC"}.get(ndim, "S" * (ndim - 3) + "YXC")
    guesses = {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TCZYX", 6: "STCZYX"}
    if ndim not in guesses:
        raise ValueError(f"cannot guess axes for {ndim}-dimensional data; give them, e.g. 'TZYX'")
    return guesses[ndim]


class PlaneSource:
    """An array-like that reads its own planes (camera.CorrectedStack): what a plane holds can
    depend on the plane it serves as context for. PlaneLayout's reads go through it."""

    shape: tuple[int, ...]

    def read_plane(self, plane: tuple[int, ...], region: Region | None = None) -> np.ndarray:
        raise NotImplementedError

    def read_plane_with_context(self, plane: tuple[int, ...], planes_each_side: int,
                                region: Region | None = None) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class PlaneLayout:
    """Where the Y, X and C axes of an array are, and how to walk its 2D planes."""

    shape: tuple[int, ...]
    axes: str

    @classmethod
    def of(cls, shape: tuple[int, ...], axes: str) -> "PlaneLayout":
        return cls(tuple(int(s) for s in shape), parse_axes(axes, len(shape)))

    @property
    def channels(self) -> int:
        return self.shape[self.axes.index("C")] if "C" in self.axes else 1

    @property
    def height(self) -> int:
        return self.shape[self.axes.index("Y")]

    @property
    def width(self) -> int:
        return self.shape[self.axes.index("X")]

    @property
    def plane_axes(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.axes) if a not in "CYX")

    @property
    def plane_count(self) -> int:
        return int(np.prod([self.shape[i] for i in self.plane_axes], dtype=np.int64))

    def plane_indices(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(range(self.shape[i]) for i in self.plane_axes))

    def describe_plane(self, plane: tuple[int, ...]) -> str:
        """A plane as a person names it, with napari's 0-based slider positions: "Z plane 4",
        "the plane at T 2, Z 4", or "the image" when there is only one."""
        named = [(self.axes[axis], index) for axis, index in zip(self.plane_axes, plane)]
        if not named:
            return "the image"
        if len(named) == 1:
            return f"{named[0][0]} plane {named[0][1]}"
        return "the plane at " + ", ".join(f"{letter} {index}" for letter, index in named)

    def flat_index(self, plane: tuple[int, ...]) -> int:
        dims = [self.shape[i] for i in self.plane_axes]
        return int(np.ravel_multi_index(plane, dims)) if dims else 0

    def plane_index(self, flat: int) -> tuple[int, ...]:
        dims = [self.shape[i] for i in self.plane_axes]
        return tuple(int(i) for i in np.unravel_index(flat, dims)) if dims else ()

    def _selection(self, plane: tuple[int, ...], region: Region | None = None) -> tuple:
        selection: list = [slice(None)] * len(self.shape)
        for axis, index in zip(self.plane_axes, plane):
            selection[axis] = index
        if region is not None:
            selection[self.axes.index("Y")], selection[self.axes.index("X")] = region
        return tuple(selection)

    def _kept_order(self) -> str:
        return "".join(a for a in self.axes if a in "CYX")

    def read_plane(self, data, plane: tuple[int, ...], region: Region | None = None) -> np.ndarray:
        """One plane (or its (rows, columns) `region`) as float32 (C, Y, X), read through the
        array's own slicing (or by the PlaneSource itself)."""
        if isinstance(data, PlaneSource):
            return data.read_plane(plane, region)
        block = np.asarray(data[self._selection(plane, region)], dtype=np.float32)
        order = self._kept_order()
        if "C" not in order:
            return block[np.newaxis]
        return np.ascontiguousarray(np.transpose(block, [order.index(a) for a in "CYX"]))

    @property
    def context_axis(self) -> str | None:
        """The axis whose neighbouring planes serve as context (Z, else T), if any has 2+ planes."""
        for letter in CONTEXT_AXES:
            if letter in self.axes and self.shape[self.axes.index(letter)] > 1:
                return letter
        return None

    def context_length(self) -> int:
        """Planes along the context axis (0 without one)."""
        letter = self.context_axis
        return 0 if letter is None else self.shape[self.axes.index(letter)]

    def check_context(self, planes_each_side: int, fix: str) -> None:
        """Refuse a context this stack cannot give without a plane seeing itself."""
        if not planes_each_side:
            return
        if self.context_axis is None:
            raise ValueError(f"a context of {planes_each_side} neighbouring plane(s) on each side needs a Z or T "
                             f"axis with several planes, but axes {self.axes!r} have none; {fix}")
        if self.context_length() < 2 * planes_each_side:
            raise ValueError(
                f"a context of {planes_each_side} plane(s) on each side needs at least {2 * planes_each_side} "
                f"planes along {self.context_axis}, but this stack has {self.context_length()}; {fix}")

    def neighbour(self, plane: tuple[int, ...], letter: str, offset: int) -> tuple[int, ...]:
        """The plane `offset` steps along `letter`; past an end of the stack, the plane as far
        the other way. Never `plane` itself: the context must not show the network the noisy
        pixels it predicts (check_context ensures one of the two exists)."""
        position = self.plane_axes.index(self.axes.index(letter))
        last = self.shape[self.axes.index(letter)] - 1
        index = plane[position] + offset
        if not 0 <= index <= last:
            index = plane[position] - offset
        if not 0 <= index <= last or offset == 0:
            raise ValueError(f"plane {plane[position]} has no neighbour {abs(offset)} planes away along {letter} "
                             f"in a stack of {last + 1}")
        return plane[:position] + (index,) + plane[position + 1 :]

    def read_plane_with_context(self, data, plane: tuple[int, ...], planes_each_side: int,
                                region: Region | None = None) -> np.ndarray:
        """(C * (1 + 2k), Y, X): the plane, then its neighbours at -k..-1, +1..+k along the
        context axis (of the (rows, columns) `region` only, where one is given)."""
        if isinstance(data, PlaneSource):
            return data.read_plane_with_context(plane, planes_each_side, region)
        blocks = [self.read_plane(data, each, region) for each in [plane, *self.context_planes(plane, planes_each_side)]]
        return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]

    def context_planes(self, plane: tuple[int, ...], planes_each_side: int) -> list[tuple[int, ...]]:
        """The neighbours at -k..-1, +1..+k along the context axis that `plane` reads."""
        if not planes_each_side:
            return []
        self.check_context(planes_each_side, "choose a smaller context")
        offsets = [*range(-planes_each_side, 0), *range(1, planes_each_side + 1)]
        return [self.neighbour(plane, self.context_axis, offset) for offset in offsets]

    def evenly_spaced(self, count: int) -> list[tuple[int, ...]]:
        """Up to `count` plane indices spread evenly over the stack, first and last included."""
        picks = np.linspace(0, self.plane_count - 1, max(1, min(count, self.plane_count))).round().astype(int)
        return [self.plane_index(int(flat)) for flat in np.unique(picks)]

    def context_window(self, plane: tuple[int, ...], planes_each_side: int) -> tuple[tuple, tuple]:
        """(selection, keep): index `data[selection]` to get `plane` with the neighbours a model
        with this context reads (one plane along every other plane axis), and `result[keep]`
        to cut that plane out of its prediction. Predicting the window gives the plane the same
        context as predicting the whole stack."""
        context_axis = self.axes.index(self.context_axis) if planes_each_side and self.context_axis else None
        selection: list = [slice(None)] * len(self.shape)
        keep: list = [slice(None)] * len(self.shape)
        for axis, index in zip(self.plane_axes, plane):
            first, length = index, 1
            if axis == context_axis:
                # 2k + 1 planes around it, shifted inward at the ends: every neighbour the
                # whole stack would give it lies inside, and the window has the 2k planes
                # check_context asks for.
                length = min(self.shape[axis], 2 * planes_each_side + 1)
                first = int(np.clip(index - planes_each_side, 0, self.shape[axis] - length))
            selection[axis] = slice(first, first + length)
            keep[axis] = slice(index - first, index - first + 1)
        return tuple(selection), tuple(keep)

    def write_plane(self, out, plane: tuple[int, ...], block: np.ndarray, region: Region | None = None) -> None:
        """Store a (C, Y, X) block into `out` at `plane` (and its (rows, columns) `region`), in
        `out`'s axis order."""
        order = self._kept_order()
        if "C" not in order:
            block = block[0]
        else:
            block = np.transpose(block, ["CYX".index(a) for a in order])
        out[self._selection(plane, region)] = block


def spread_planes(images, count: int) -> list[tuple[object, PlaneLayout, tuple[int, ...]]]:
    """Up to about `count` planes spread over several images, as (data, layout, plane): each
    image (at most `count` of them, evenly chosen) gives max(1, count // images) evenly
    spaced planes. `images` is a sequence of (data, layout) pairs; one image gives the planes
    `layout.evenly_spaced(count)` gives."""
    images = list(images)
    if len(images) > count:
        images = [images[int(i)] for i in np.unique(np.linspace(0, len(images) - 1, count).round().astype(int))]
    each = max(1, count // len(images))
    return [(data, layout, plane) for data, layout in images for plane in layout.evenly_spaced(each)]
