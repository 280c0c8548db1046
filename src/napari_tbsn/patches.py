"""Training patches: planes loaded once, a held-out validation set, random augmented crops."""

from __future__ import annotations

import numpy as np

from .axes import PlaneLayout
from .normalization import Normalizer


def check_finite(block: np.ndarray, where: str) -> None:
    if not np.all(np.isfinite(block)):
        raise ValueError(
            f"{where} contains NaN or infinite values; replace them first "
            "(for example numpy.nan_to_num, or crop them away)"
        )


class PatchSampler:
    """Random square crops of the training planes, kept apart from the validation blocks.

    Each plane is cut into a grid of patch-sized blocks; about `validation_fraction` of the
    blocks (at least one, at most `validation_max`) are held out for validation, and training
    crops never overlap them. With a single block there is nothing to hold out: validation
    then reuses it (and says so in `shared_validation`).
    """

    def __init__(
        self,
        planes: np.ndarray,
        patch_size: int,
        validation_fraction: float,
        validation_max: int,
        rng: np.random.Generator,
    ) -> None:
        self.planes = planes  # (N, C, H, W) float32, normalised
        self.patch_size = patch_size
        count, _, height, width = planes.shape
        rows, cols = height // patch_size, width // patch_size
        blocks = [(n, r, c) for n in range(count) for r in range(rows) for c in range(cols)]
        n_validation = int(np.clip(round(validation_fraction * len(blocks)), 1, validation_max))
        self.shared_validation = len(blocks) < 2
        if self.shared_validation:
            chosen = blocks
        else:
            n_validation = min(n_validation, len(blocks) - 1)
            chosen = [blocks[i] for i in rng.choice(len(blocks), n_validation, replace=False)]
        self.held_out = np.zeros((count, rows + 1, cols + 1), dtype=bool)
        if not self.shared_validation:
            for n, r, c in chosen:
                self.held_out[n, r, c] = True
        p = patch_size
        self.validation = np.stack([planes[n, :, r * p : (r + 1) * p, c * p : (c + 1) * p] for n, r, c in chosen])

    @property
    def training_pixels(self) -> int:
        """The pixels of the training planes that training crops may cover (the held-out blocks left out)."""
        count, _, height, width = self.planes.shape
        return count * height * width - int(self.held_out.sum()) * self.patch_size**2

    def _overlaps_validation(self, n: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        p = self.patch_size
        r0, c0 = y // p, x // p
        r1, c1 = (y + p - 1) // p, (x + p - 1) // p
        h = self.held_out
        return h[n, r0, c0] | h[n, r0, c1] | h[n, r1, c0] | h[n, r1, c1]

    def sample(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """A (B, C, P, P) batch of random crops with random flips and 90-degree rotations."""
        count, _, height, width = self.planes.shape
        p = self.patch_size
        chosen: list[tuple[int, int, int]] = []
        while len(chosen) < batch_size:
            draws = 4 * batch_size
            n = rng.integers(0, count, draws)
            y = rng.integers(0, height - p + 1, draws)
            x = rng.integers(0, width - p + 1, draws)
            keep = ~self._overlaps_validation(n, y, x)
            chosen.extend(zip(n[keep], y[keep], x[keep]))
        crops = []
        for n, y, x in chosen[:batch_size]:
            crop = self.planes[n, :, y : y + p, x : x + p]
            crop = np.rot90(crop, k=int(rng.integers(4)), axes=(1, 2))
            if rng.integers(2):
                crop = crop[:, :, ::-1]
            crops.append(crop)
        return np.ascontiguousarray(np.stack(crops))


def load_training_planes(
    data, layout: PlaneLayout, normalizer: Normalizer, max_pixels: int, planes_each_side: int = 0
) -> np.ndarray:
    """Evenly spaced planes, normalised, as (N, C * (1 + 2k), H, W) float32 (each plane then
    its k neighbours on either side), within a pixel budget."""
    depth = layout.channels * (1 + 2 * planes_each_side)
    per_plane = depth * layout.height * layout.width
    picks = layout.evenly_spaced(max(1, max_pixels // max(per_plane, 1)))
    planes = np.empty((len(picks), depth, layout.height, layout.width), dtype=np.float32)
    for slot, plane in enumerate(picks):
        block = layout.read_plane_with_context(data, plane, planes_each_side)
        check_finite(block, f"{layout.describe_plane(plane)} of the input")
        planes[slot] = normalizer.normalize(block)
    return planes


def channels_as_samples(planes: np.ndarray, channels: int) -> np.ndarray:
    """(N, P * C, H, W) planes of C channels with their context planes -> (N * C, P, H, W): each
    channel, with its own context planes, a plane of its own."""
    count, depth, height, width = planes.shape
    per_channel = depth // channels
    return np.ascontiguousarray(planes.reshape(count, per_channel, channels, height, width).transpose(0, 2, 1, 3, 4)
                                .reshape(count * channels, per_channel, height, width))


def fitting_patch_size(requested: int, height: int, width: int, granularity: int) -> int:
    """The largest patch up to `requested` that fits the image and divides by `granularity`."""
    fits = (min(height, width) // granularity) * granularity
    size = min((max(requested, granularity) // granularity) * granularity, fits)
    if size < granularity:
        raise ValueError(
            f"the image is {height}x{width} pixels; fitting needs at least {granularity}x{granularity} "
            "(choose the tiny preset or pd=1, or a larger image)"
        )
    return size
