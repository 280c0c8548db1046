"""Tiled prediction of one plane: overlapping tiles, batched, blended with smooth weights.

Peak memory follows the tile size and the plane size, never the stack size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator

import numpy as np
import torch

from .progress import drive


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` overlapping by >= `overlap`."""
    if length <= tile:
        return [0]
    step = max(tile - overlap, 1)
    count = math.ceil((length - tile) / step) + 1
    # Spread the tiles evenly so every overlap is at least `overlap`.
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def blend_ramp(tile: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """1D weights: a raised-cosine ramp over the overlap, flat (1) inside and at image edges."""
    weights = np.ones(tile, dtype=np.float32)
    if overlap > 0:
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap, dtype=np.float32) + 0.5) / overlap) ** 2
        if not at_start:
            weights[:overlap] = ramp
        if not at_end:
            weights[tile - overlap :] = ramp[::-1]
    return weights


class TiledPredictor:
    """Runs `model` ((B, C, h, w) tensor -> (B, C_out, h, w) tensor) over a whole plane."""

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        size_multiple: int,
        tile_size: int,
        tile_overlap: int,
        batch_size: int,
        device: torch.device,
    ) -> None:
        if tile_size < size_multiple or tile_size % size_multiple:
            raise ValueError(f"tile_size must be a positive multiple of {size_multiple}, got {tile_size}")
        if not 0 <= tile_overlap < tile_size:
            raise ValueError(f"tile_overlap must be between 0 and tile_size - 1, got {tile_overlap}")
        self.model = model
        self.size_multiple = size_multiple
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.batch_size = max(1, batch_size)
        self.device = device

    def minimum_size(self) -> int:
        return self.size_multiple

    def _padded_shape(self, height: int, width: int) -> tuple[int, int]:
        tile_h = min(self.tile_size, round_up(height, self.size_multiple))
        tile_w = min(self.tile_size, round_up(width, self.size_multiple))
        return max(height, tile_h), max(width, tile_w)

    def tile_count(self, height: int, width: int) -> int:
        padded_h, padded_w = self._padded_shape(height, width)
        tile_h, tile_w = min(self.tile_size, padded_h), min(self.tile_size, padded_w)
        return len(tile_starts(padded_h, tile_h, self.tile_overlap)) * len(
            tile_starts(padded_w, tile_w, self.tile_overlap)
        )

    def _tiles(self, height: int, width: int) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
        tile_h, tile_w = min(self.tile_size, height), min(self.tile_size, width)
        ys = tile_starts(height, tile_h, self.tile_overlap)
        xs = tile_starts(width, tile_w, self.tile_overlap)
        for y in ys:
            ramp_y = blend_ramp(tile_h, min(self.tile_overlap, tile_h // 2), y == ys[0], y == ys[-1])
            for x in xs:
                ramp_x = blend_ramp(tile_w, min(self.tile_overlap, tile_w // 2), x == xs[0], x == xs[-1])
                yield y, x, tile_h, tile_w, ramp_y[:, None] * ramp_x[None, :]

    def predict(self, plane: np.ndarray) -> np.ndarray:
        """(C, H, W) float32 -> (C_out, H, W) float32."""
        return drive(self.predict_iter(plane))

    def predict_iter(self, plane: np.ndarray) -> Generator[tuple[int, int], None, np.ndarray]:
        """predict() as a generator yielding (tiles done, tiles in all) after each batch."""
        channels, height, width = plane.shape
        if min(height, width) < self.size_multiple:
            raise ValueError(
                f"the image is {height}x{width} pixels; this network needs at least "
                f"{self.size_multiple}x{self.size_multiple}"
            )
        padded_h, padded_w = self._padded_shape(height, width)
        # Reflect padding (no edge repeat) puts each copied pixel on its own parity class,
        # so the padding cannot show a pixel to its own blind spot.
        padded = np.pad(plane, ((0, 0), (0, padded_h - height), (0, padded_w - width)), mode="reflect")
        tiles = list(self._tiles(padded_h, padded_w))
        accumulated: np.ndarray | None = None
        weight_sum = np.zeros((padded_h, padded_w), dtype=np.float32)
        done = 0
        for start in range(0, len(tiles), self.batch_size):
            group = tiles[start : start + self.batch_size]
            batch = np.stack([padded[:, y : y + h, x : x + w] for y, x, h, w, _ in group])
            with torch.no_grad():
                result = self.model(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()
            if accumulated is None:
                accumulated = np.zeros((result.shape[1], padded_h, padded_w), dtype=np.float32)
            for (y, x, h, w, weights), tile_out in zip(group, result):
                accumulated[:, y : y + h, x : x + w] += tile_out * weights
                weight_sum[y : y + h, x : x + w] += weights
            done += len(group)
            yield done, len(tiles)
        assert accumulated is not None
        return accumulated[:, :height, :width] / weight_sum[:height, :width]
