"""Axis letters (STCZYX): parse, validate, guess, and cut a stack into 2D planes.

The network is 2D over Y and X; C is its channels; every S, T and Z index is one plane.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

AXIS_LETTERS = "STCZYX"
CONTEXT_AXES = "ZT"  # where neighbouring planes show the same structures: depth first, then time


def parse_axes(axes: str, ndim: int) -> str:
    """Validate `axes` for an array of `ndim` dimensions; return it in upper case."""
    if not isinstance(axes, str):
        raise TypeError(f"axes must be a string such as 'ZYX', got {type(axes).__name__}")
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


def guess_axes(shape: tuple[int, ...], rgb: bool = False) -> str:
    """A sensible default for data with no axis metadata (napari's conventions)."""
    ndim = len(shape)
    if rgb:
        return {3: "YXC", 4: "ZYXC", 5: "TZYXC"}.get(ndim, "S" * (ndim - 3) + "YXC")
    guesses = {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TCZYX", 6: "STCZYX"}
    if ndim not in guesses:
        raise ValueError(f"cannot guess axes for {ndim}-dimensional data; give them, e.g. 'TZYX'")
    return guesses[ndim]


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

    def plane_index(self, flat: int) -> tuple[int, ...]:
        dims = [self.shape[i] for i in self.plane_axes]
        return tuple(int(i) for i in np.unravel_index(flat, dims)) if dims else ()

    def _selection(self, plane: tuple[int, ...]) -> tuple:
        selection: list = [slice(None)] * len(self.shape)
        for axis, index in zip(self.plane_axes, plane):
            selection[axis] = index
        return tuple(selection)

    def _kept_order(self) -> str:
        return "".join(a for a in self.axes if a in "CYX")

    def read_plane(self, data, plane: tuple[int, ...]) -> np.ndarray:
        """One plane as float32 (C, Y, X), read through the array's own slicing."""
        block = np.asarray(data[self._selection(plane)], dtype=np.float32)
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

    def neighbour(self, plane: tuple[int, ...], letter: str, offset: int) -> tuple[int, ...]:
        """The plane `offset` steps along `letter`, mirrored at the ends of the stack."""
        position = self.plane_axes.index(self.axes.index(letter))
        last = self.shape[self.axes.index(letter)] - 1
        index = plane[position] + offset
        index = -index if index < 0 else index
        index = 2 * last - index if index > last else index
        return plane[:position] + (min(max(index, 0), last),) + plane[position + 1 :]

    def read_plane_with_context(self, data, plane: tuple[int, ...], planes_each_side: int) -> np.ndarray:
        """(C * (1 + 2k), Y, X): the plane, then its neighbours at -k..-1, +1..+k along the
        context axis."""
        blocks = [self.read_plane(data, plane)]
        if planes_each_side:
            letter = self.context_axis
            if letter is None:
                raise ValueError(f"axes {self.axes!r} have no Z or T axis with neighbouring planes")
            offsets = [*range(-planes_each_side, 0), *range(1, planes_each_side + 1)]
            blocks += [self.read_plane(data, self.neighbour(plane, letter, offset)) for offset in offsets]
        return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]

    def write_plane(self, out, plane: tuple[int, ...], block: np.ndarray) -> None:
        """Store a (C, Y, X) block into `out` at `plane`, in `out`'s axis order."""
        order = self._kept_order()
        if "C" not in order:
            block = block[0]
        else:
            block = np.transpose(block, ["CYX".index(a) for a in order])
        out[self._selection(plane)] = block
