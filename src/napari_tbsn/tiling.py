"""Tiled prediction of one plane: overlapping tiles, batched, blended with smooth weights.

Peak memory follows the tile size and the plane size, never the stack size.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator

import numpy as np
import torch

from .axes import Region
from .devices import TILE_MEMORY_SHARE, free_memory
from .progress import drive

# Reflected context given to the pixels at the image edge, at least this many pixels on each
# side (the padding up to the network's grid is shared between the two sides). Without it the
# outer two or three rows and columns lost up to 0.2 dB on a 128x128 stack (measured).
BORDER_MARGIN = 8


def plane_holder(device: torch.device, plane_bytes: int) -> torch.device:
    """Where a plane's padded input and blended output live while its tiles run: on the device
    that runs them, so that a GPU keeps the data between passes (one copy in and one out per
    plane, no wait for the host after every batch), unless they would crowd the tiles' own
    share of its memory: then on the host."""
    if device.type == "cpu" or plane_bytes <= TILE_MEMORY_SHARE * free_memory(device):
        return device
    return torch.device("cpu")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def reflect_indices(length: int, before: int, after: int, period: int = 1) -> np.ndarray:
    """Source indices of a side of `length` pixels padded by `before` and `after` pixels, each
    padded pixel a mirror copy within its residue class modulo `period`.

    A blind-spot network run on pixel-shuffled sub-images of factor `period` is blind to the
    pixels at multiples of 2 * period from the one it predicts. Reflecting each residue class
    about its own first and last pixel puts every copy of a pixel at such a distance from it,
    so the padding can never show a pixel to its own blind spot (period 1 is numpy's "reflect").
    """
    index = np.arange(-before, length + after)
    residue = index % period
    first, last = residue, length - 1 - (length - 1 - residue) % period
    if np.any(last <= first) and (before or after):
        raise ValueError(f"cannot reflect {length} pixels in classes of {period}: too few")
    while True:
        low, high = index < first, index > last
        if not (low.any() or high.any()):
            return index
        index = np.where(low, 2 * first - index, np.where(high, 2 * last - index, index))


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` overlapping by >= `overlap`,
    each start a multiple of `align` (length and tile must be multiples of it)."""
    if length <= tile:
        return [0]
    step = max(((tile - overlap) // align) * align, align)
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def _edge_ramp(overlap: int) -> np.ndarray:
    """Weights across an overlap, from the tile edge inwards: zero over the outer part (where
    the missing context outside the tile changes the output), then a short raised-cosine
    rise to 1 in the middle of the overlap, where both neighbours are far from their edges."""
    span = max(1, min(32, overlap // 4))
    discard = (overlap - span) // 2
    ramp = np.ones(overlap, dtype=np.float32)
    ramp[:discard] = 0.0
    rising = np.sin(0.5 * np.pi * (np.arange(span, dtype=np.float32) + 0.5) / span) ** 2
    ramp[discard : discard + span] = rising[: overlap - discard]
    return ramp


def blend_ramp(tile: int, overlap_before: int, overlap_after: int) -> np.ndarray:
    """1D tile weights given the overlaps with the previous and the next tile (0 at an
    image edge, where the weights stay flat)."""
    weights = np.ones(tile, dtype=np.float32)
    if overlap_before > 0:
        weights[:overlap_before] = _edge_ramp(overlap_before)
    if overlap_after > 0:
        weights[tile - overlap_after :] = np.minimum(weights[tile - overlap_after :], _edge_ramp(overlap_after)[::-1])
    return weights


def _overlaps(starts: list[int], tile: int) -> list[tuple[int, int]]:
    before = [0] + [previous + tile - start for previous, start in zip(starts, starts[1:])]
    return list(zip(before, before[1:] + [0]))


class TiledPredictor:
    """Runs `model` over a whole plane: model(batch, inside=mask) maps a (B, C, h, w) tensor of
    tiles to (B, C_out, h, w); the (B, 1, h, w) mask is 1 on the image's own pixels and 0 on
    its reflected padding."""

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        size_multiple: int,
        tile_size: int,
        tile_overlap: int,
        batch_size: int,
        device: torch.device,
        period: int = 1,
    ) -> None:
        if tile_size < size_multiple or tile_size % size_multiple:
            raise ValueError(f"tile_size must be a positive multiple of {size_multiple}, got {tile_size}")
        if not 0 <= tile_overlap <= tile_size - size_multiple:
            raise ValueError(
                f"tile_overlap must be between 0 and tile_size - {size_multiple} "
                f"(tiles start on a {size_multiple}-pixel grid), got {tile_overlap}"
            )
        self.model = model
        self.size_multiple = size_multiple
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.batch_size = max(1, batch_size)
        self.device = device
        self.period = period  # the pixel-shuffle factor the model predicts with

    def padding(self, length: int) -> tuple[int, int]:
        """Reflected pixels before and after a side of `length` pixels: at least BORDER_MARGIN
        on each side, to a whole multiple of the network's granularity, so that every tile sits
        on the same grid of windows and channel-statistics blocks as a whole-image pass would."""
        extra = round_up(length + 2 * BORDER_MARGIN, self.size_multiple) - length
        before = (extra // 4) * 2  # even: the parity classes keep their image coordinates
        return before, extra - before

    def tile_length(self, padded: int) -> int:
        """The tile's length along a padded side: the whole side where it is no longer than a
        tile_size side with its border padding, else tile_size. So a plane that fits the tile
        runs in one pass rather than in two nearly whole, overlapping ones."""
        return padded if padded <= self.tile_size + sum(self.padding(self.tile_size)) else self.tile_size

    def _tiles(self, height: int, width: int) -> Iterator[tuple[int, int, int, int, tuple, tuple]]:
        """(top, left, height, width, overlaps along Y, overlaps along X) of every tile."""
        tile_h, tile_w = self.tile_length(height), self.tile_length(width)
        ys = tile_starts(height, tile_h, self.tile_overlap, self.size_multiple)
        xs = tile_starts(width, tile_w, self.tile_overlap, self.size_multiple)
        for y, overlaps_y in zip(ys, _overlaps(ys, tile_h)):
            for x, overlaps_x in zip(xs, _overlaps(xs, tile_w)):
                yield y, x, tile_h, tile_w, overlaps_y, overlaps_x

    def predict(self, plane: np.ndarray) -> np.ndarray:
        """(C, H, W) float32 -> (C_out, H, W) float32."""
        return drive(self.predict_iter(plane))

    def predict_iter(self, plane, region: Region | None = None) -> Generator[tuple[int, int], None, np.ndarray]:
        """predict() as a generator yielding (tiles done, tiles in all) after each batch.

        `plane`: a (C, H, W) float32 array, or any object with that `shape` whose [:, rows,
        columns] slicing reads a block. With `region` (rows, columns) only the tiles that reach
        it are run and only the pixels they need are read; the result, (C_out, h, w), equals
        that region of the whole-plane result."""
        channels, height, width = plane.shape
        if min(height, width) < self.size_multiple:
            raise ValueError(
                f"the image is {height}x{width} pixels; this network needs at least "
                f"{self.size_multiple}x{self.size_multiple}"
            )
        (top, bottom), (left, right) = self.padding(height), self.padding(width)
        rows = reflect_indices(height, top, bottom, self.period)
        columns = reflect_indices(width, left, right, self.period)
        want_y, want_x = _wanted(region, height, width, top, left)
        reaching = [tile for tile in self._tiles(len(rows), len(columns))
                    if _meets(tile[0], tile[2], want_y) and _meets(tile[1], tile[3], want_x)]
        span_y = (min(t[0] for t in reaching), max(t[0] + t[2] for t in reaching))
        span_x = (min(t[1] for t in reaching), max(t[1] + t[3] for t in reaching))
        # The span's input, 3 output channels per input channel and the weights: where they live.
        holder = plane_holder(self.device, 4 * (4 * channels + 1) * (span_y[1] - span_y[0]) * (span_x[1] - span_x[0]))

        def ramp(length: int, overlaps: tuple[int, int]) -> torch.Tensor:
            return torch.from_numpy(blend_ramp(length, *overlaps)).to(holder)

        tiles = [(y, x, h, w, ramp(h, over_y)[:, None] * ramp(w, over_x)[None, :])
                 for y, x, h, w, over_y, over_x in reaching]
        padded = torch.from_numpy(_read_span(plane, rows, columns, span_y, span_x)).to(holder)
        inside = torch.from_numpy(np.outer((np.arange(*span_y) >= top) & (np.arange(*span_y) < top + height),
                                           (np.arange(*span_x) >= left) & (np.arange(*span_x) < left + width))
                                  .astype(np.float32)).to(holder)
        accumulated: torch.Tensor | None = None
        weight_sum = torch.zeros(inside.shape, dtype=torch.float32, device=holder)
        done = 0
        for start in range(0, len(tiles), self.batch_size):
            group = [(y - span_y[0], x - span_x[0], h, w, weights)
                     for y, x, h, w, weights in tiles[start : start + self.batch_size]]
            batch = torch.stack([padded[:, y : y + h, x : x + w] for y, x, h, w, _ in group])
            mask = torch.stack([inside[None, y : y + h, x : x + w] for y, x, h, w, _ in group])
            with torch.no_grad():
                result = self.model(batch.to(self.device), inside=mask.to(self.device)).float().to(holder)
            if accumulated is None:
                accumulated = torch.zeros((result.shape[1], *inside.shape), dtype=torch.float32, device=holder)
            for (y, x, h, w, weights), tile_out in zip(group, result):
                accumulated[:, y : y + h, x : x + w] += tile_out * weights
                weight_sum[y : y + h, x : x + w] += weights
            done += len(group)
            yield done, len(tiles)
        assert accumulated is not None
        kept = (slice(want_y[0] - span_y[0], want_y[1] - span_y[0]), slice(want_x[0] - span_x[0], want_x[1] - span_x[0]))
        return (accumulated[(slice(None), *kept)] / weight_sum[kept]).cpu().numpy()


def _wanted(region: Region | None, height: int, width: int, top: int, left: int) -> tuple[tuple[int, int], ...]:
    """The region's rows and columns in padded coordinates (the whole image without one)."""
    if region is None:
        return (top, top + height), (left, left + width)
    (first_row, end_row, _), (first_column, end_column, _) = region[0].indices(height), region[1].indices(width)
    if end_row <= first_row or end_column <= first_column:
        raise ValueError(f"the region {region} of a {height}x{width} plane is empty")
    return (top + first_row, top + end_row), (left + first_column, left + end_column)


def _meets(start: int, length: int, wanted: tuple[int, int]) -> bool:
    return start < wanted[1] and start + length > wanted[0]


def _read_span(plane, rows: np.ndarray, columns: np.ndarray, span_y: tuple[int, int],
               span_x: tuple[int, int]) -> np.ndarray:
    """The padded plane over span_y x span_x, reading only the block of `plane` it mirrors."""
    rows, columns = rows[span_y[0] : span_y[1]], columns[span_x[0] : span_x[1]]
    low_row, low_column = int(rows.min()), int(columns.min())
    block = np.asarray(plane[:, low_row : int(rows.max()) + 1, low_column : int(columns.max()) + 1], dtype=np.float32)
    return block[:, (rows - low_row)[:, None], (columns - low_column)[None, :]]


def margin_windows(length: int, step: int, margin: int, wanted: tuple[int, int] | None = None,
                   multiple: int = 1) -> list[tuple[int, int, int, int]]:
    """(window start, window end, kept start, kept end) along a padded side of `length`: each
    window keeps `step` pixels and reaches `margin` beyond them, except at the side's ends.
    With `wanted` (start, end), the kept pixels start at its start (on the `multiple` grid) and
    end at its end (rounded up to the grid): a block computes itself and its margin only."""
    if wanted is None:
        if length <= step + 2 * margin:
            return [(0, length, 0, length)]
        first, last = 0, length
    else:
        first, last = wanted[0] // multiple * multiple, min(round_up(wanted[1], multiple), length)
    windows = []
    for start in range(first, last, step):
        end = min(start + step, last)
        windows.append((max(start - margin, 0), min(end + margin, length), start, end))
    return windows


class MarginTiledPredictor:
    """Runs a network of bounded receptive field over a plane in windows cut from the plane
    reflected as the network's own forward pass reflects it, each keeping `step` pixels at least
    `margin` from its cut edges: the result equals one whole-plane pass. Step and margin must be
    multiples of the network's grid, so every window sits on the whole pass's grid."""

    def __init__(self, core: Callable[[torch.Tensor], torch.Tensor], padding: Callable[[int], tuple[int, int]],
                 multiple: int, margin: int, step: int, device: torch.device) -> None:
        self.core, self.padding, self.margin, self.multiple = core, padding, margin, multiple
        self.step = max(multiple, step // multiple * multiple)
        self.device = device

    def predict_iter(self, plane, region: Region | None = None) -> Generator[tuple[int, int], None, np.ndarray]:
        """(C, H, W) float32 -> (C_out, H, W) float32, yielding (windows done, windows in all).
        `plane` and `region` as for TiledPredictor.predict_iter: with a region, only the windows
        that keep its pixels run, and the result equals that region of the whole-plane pass."""
        _, height, width = plane.shape
        (top, bottom), (left, right) = self.padding(height), self.padding(width)
        rows, columns = reflect_indices(height, top, bottom), reflect_indices(width, left, right)
        want_y, want_x = _wanted(region, height, width, top, left)
        # A region's windows keep the region (on the grid) and no more: a block costs itself and its margin.
        wanted_y, wanted_x = (None, None) if region is None else (want_y, want_x)
        windows_y = margin_windows(len(rows), self.step, self.margin, wanted_y, self.multiple)
        windows_x = margin_windows(len(columns), self.step, self.margin, wanted_x, self.multiple)
        span_y = (min(w[0] for w in windows_y), max(w[1] for w in windows_y))
        span_x = (min(w[0] for w in windows_x), max(w[1] for w in windows_x))
        holder = plane_holder(self.device, 4 * 2 * plane.shape[0] * (span_y[1] - span_y[0]) * (span_x[1] - span_x[0]))
        padded = torch.from_numpy(_read_span(plane, rows, columns, span_y, span_x)).to(holder)
        windows = [(y, x) for y in windows_y for x in windows_x]
        result: torch.Tensor | None = None
        for done, ((y0, y1, keep_y0, keep_y1), (x0, x1, keep_x0, keep_x1)) in enumerate(windows, 1):
            cut = padded[None, :, y0 - span_y[0] : y1 - span_y[0], x0 - span_x[0] : x1 - span_x[0]]
            with torch.no_grad():
                output = self.core(cut.contiguous().to(self.device))[0].float().to(holder)
            if result is None:
                result = torch.empty((output.shape[0], span_y[1] - span_y[0], span_x[1] - span_x[0]),
                                     dtype=torch.float32, device=holder)
            result[:, keep_y0 - span_y[0] : keep_y1 - span_y[0], keep_x0 - span_x[0] : keep_x1 - span_x[0]] = \
                output[:, keep_y0 - y0 : keep_y1 - y0, keep_x0 - x0 : keep_x1 - x0]
            yield done, len(windows)
        assert result is not None
        return result[:, want_y[0] - span_y[0] : want_y[1] - span_y[0], want_x[0] - span_x[0] : want_x[1] - span_x[0]] \
            .cpu().numpy()
