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

    `planes` is one (N, C, H, W) array, or a list of them (several images: H and W may differ,
    C may not). Each plane is cut into a grid of patch-sized blocks; about
    `validation_fraction` of all blocks (at least one, at most `validation_max`) are held out
    for validation, drawn across every image, and training crops never overlap them. Crops
    come from each image in proportion to its pixels. With a single block there is nothing to
    hold out: validation then reuses it (and says so in `shared_validation`).

    With `held_out_pixels` > 0 (the blind-spot fit), no block is held out: that share of the
    pixels, scattered over every plane, is held out instead. Crops come from anywhere, with a
    mask that takes the held-out pixels out of the training loss (sample_with_mask), and the
    validation crops (up to `validation_max`, spread over the images) score the network on them
    alone: a blind-spot network never sees a pixel it predicts, and is never trained to predict
    these, so their blind-spot loss estimates the MSE plus the noise variance without the bias a
    network fitted to those very noisy values would have.
    """

    def __init__(
        self,
        planes: np.ndarray | list[np.ndarray],
        patch_size: int,
        validation_fraction: float,
        validation_max: int,
        rng: np.random.Generator,
        held_out_pixels: float = 0.0,
    ) -> None:
        self.groups = [planes] if isinstance(planes, np.ndarray) else list(planes)
        if len({group.shape[1] for group in self.groups}) != 1:
            raise ValueError("every image fitted together needs the same number of channels")
        self.patch_size = p = patch_size
        self.pixel_masks: list[np.ndarray] | None = None
        self.validation_masks: np.ndarray | None = None
        self.validation_blocks: list[tuple[int, int, int, int]] = []
        if held_out_pixels > 0:
            self._hold_out_pixels(held_out_pixels, validation_max, rng)
            return
        blocks = [(g, n, r, c) for g, group in enumerate(self.groups) for n in range(group.shape[0])
                  for r in range(group.shape[2] // p) for c in range(group.shape[3] // p)]
        n_validation = int(np.clip(round(validation_fraction * len(blocks)), 1, validation_max))
        self.shared_validation = len(blocks) < 2
        if self.shared_validation:
            chosen = blocks
        else:
            n_validation = min(n_validation, len(blocks) - 1)
            chosen = [blocks[i] for i in rng.choice(len(blocks), n_validation, replace=False)]
        self.held_out = [np.zeros((group.shape[0], group.shape[2] // p + 1, group.shape[3] // p + 1), dtype=bool)
                         for group in self.groups]
        if not self.shared_validation:
            for g, n, r, c in chosen:
                self.held_out[g][n, r, c] = True
        self.validation_blocks = chosen  # (image, plane, block row, block column) of each validation block
        self.validation = np.stack([self.groups[g][n, :, r * p : (r + 1) * p, c * p : (c + 1) * p]
                                    for g, n, r, c in chosen])
        # Each image's share of the crops: its crop positions clear of the held-out blocks, so that
        # every such position of every image is equally likely, as within one image.
        positions = np.array([self._free_positions(g) for g in range(len(self.groups))], dtype=float)
        self._weights = positions / positions.sum()

    def _hold_out_pixels(self, fraction: float, crops: int, rng: np.random.Generator) -> None:
        """Hold out `fraction` of the pixels of every plane (the same (y, x) in all its channels),
        and pick up to `crops` validation crops: every image's planes covered by a grid of
        patch-sized crops (overlapping where the size does not divide), drawn at random. Each
        held-out pixel scores once (in the first crop that holds it), and each crop holds at
        least one."""
        p = self.patch_size
        self.pixel_masks = [np.stack([rng.random(group.shape[2:], dtype=np.float32) < fraction for _ in group])
                            for group in self.groups]
        self.held_out = [np.zeros((group.shape[0], group.shape[2] // p + 1, group.shape[3] // p + 1), dtype=bool)
                         for group in self.groups]
        self.shared_validation = False

        def starts(length: int) -> np.ndarray:
            return np.unique(np.linspace(0, length - p, max(1, -(-length // p))).round().astype(int))

        grid = [(g, n, y, x) for g, group in enumerate(self.groups) for n in range(group.shape[0])
                for y in starts(group.shape[2]) for x in starts(group.shape[3])]
        chosen = [grid[i] for i in sorted(rng.choice(len(grid), min(crops, len(grid)), replace=False))]
        self.validation = np.stack([self.groups[g][n, :, y : y + p, x : x + p] for g, n, y, x in chosen])
        scored = [np.zeros(mask.shape, dtype=bool) for mask in self.pixel_masks]
        masks = []
        for g, n, y, x in chosen:
            window = (n, slice(y, y + p), slice(x, x + p))
            if not self.pixel_masks[g][window].any():
                self.pixel_masks[g][n, y + p // 2, x + p // 2] = True
            masks.append(self.pixel_masks[g][window] & ~scored[g][window])
            scored[g][window] |= self.pixel_masks[g][window]
        self.validation_masks = np.stack(masks)
        self._weights = np.array([group.shape[0] * (group.shape[2] - p + 1) * (group.shape[3] - p + 1)
                                  for group in self.groups], dtype=float)
        self._weights /= self._weights.sum()

    @property
    def planes(self) -> np.ndarray:
        """The training planes of a single image."""
        if len(self.groups) != 1:
            raise ValueError("this sampler holds several images: read .groups")
        return self.groups[0]

    def _free_positions(self, g: int) -> int:
        """How many crop corners (plane, y, x) of image g overlap no held-out block. A corner's
        crop touches block rows y // p and (y + p - 1) // p: corners are counted by those pairs."""
        count, _, height, width = self.groups[g].shape
        p = self.patch_size

        def classes(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            corners = np.arange(length - p + 1)
            pairs, counts = np.unique(np.stack([corners // p, (corners + p - 1) // p]), axis=1, return_counts=True)
            return pairs[0], pairs[1], counts

        r0, r1, row_counts = classes(height)
        c0, c1, column_counts = classes(width)
        held = self.held_out[g]
        rows0, rows1 = r0[:, None], r1[:, None]
        blocked = (held[:, rows0, c0[None, :]] | held[:, rows0, c1[None, :]] | held[:, rows1, c0[None, :]]
                   | held[:, rows1, c1[None, :]])
        return int(((~blocked) * row_counts[:, None] * column_counts[None, :]).sum())

    def _free_pixels(self, g: int) -> int:
        count, _, height, width = self.groups[g].shape
        return count * height * width - int(self.held_out[g].sum()) * self.patch_size**2

    @property
    def training_pixels(self) -> int:
        """The pixels of the training planes that training crops may cover (the held-out blocks left out)."""
        return sum(self._free_pixels(g) for g in range(len(self.groups)))

    def _overlaps_validation(self, g: int, n: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        p = self.patch_size
        r0, c0 = y // p, x // p
        r1, c1 = (y + p - 1) // p, (x + p - 1) // p
        h = self.held_out[g]
        return h[n, r0, c0] | h[n, r0, c1] | h[n, r1, c0] | h[n, r1, c1]

    def _draw(self, rng: np.random.Generator, draws: int) -> list[tuple[int, int, int, int]]:
        """`draws` random crop corners (image, plane, y, x) outside the validation blocks."""
        p = self.patch_size
        if len(self.groups) == 1:  # one image: the draws of a single-image fit, as they always were
            count, _, height, width = self.groups[0].shape
            n = rng.integers(0, count, draws)
            y = rng.integers(0, height - p + 1, draws)
            x = rng.integers(0, width - p + 1, draws)
            keep = ~self._overlaps_validation(0, n, y, x)
            return [(0, a, b, c) for a, b, c in zip(n[keep], y[keep], x[keep])]
        images = rng.choice(len(self.groups), draws, p=self._weights)
        chosen = []
        for g in np.unique(images):  # each image's quota filled from its own free crops
            count, _, height, width = self.groups[g].shape
            quota = int((images == g).sum())
            picks: list[tuple[int, int, int, int]] = []
            while len(picks) < quota:
                draws = max(2 * quota, 64)
                n = rng.integers(0, count, draws)
                y = rng.integers(0, height - p + 1, draws)
                x = rng.integers(0, width - p + 1, draws)
                keep = ~self._overlaps_validation(int(g), n, y, x)
                picks.extend((int(g), a, b, c) for a, b, c in zip(n[keep], y[keep], x[keep]))
            chosen.extend(picks[:quota])
        order = rng.permutation(len(chosen))  # images mixed within a batch
        return [chosen[i] for i in order]

    def sample(self, rng: np.random.Generator, batch_size: int, turns: bool = True) -> np.ndarray:
        """A (B, C, P, P) batch of random crops with random flips and 90-degree rotations (none
        without `turns`: rows stay rows)."""
        return self._sample(rng, batch_size, with_mask=False, turns=turns)[0]

    def sample_with_mask(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """sample(), and a (B, 1, P, P) float mask: 0 on held-out pixels, 1 where the loss may look
        (None where no pixel is held out)."""
        return self._sample(rng, batch_size, with_mask=self.pixel_masks is not None)

    def _sample(self, rng: np.random.Generator, batch_size: int, with_mask: bool,
                turns: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        p = self.patch_size
        chosen: list[tuple[int, int, int, int]] = []
        while len(chosen) < batch_size:
            chosen.extend(self._draw(rng, 4 * batch_size if len(self.groups) == 1 else batch_size))
        crops, masks = [], []
        for g, n, y, x in chosen[:batch_size]:
            crop = self.groups[g][n, :, y : y + p, x : x + p]
            mask = self.pixel_masks[g][n, None, y : y + p, x : x + p] if with_mask else crop[:1]
            quarter_turns, flip = int(rng.integers(4)) if turns else 0, bool(rng.integers(2))
            crop, mask = (np.rot90(block, k=quarter_turns, axes=(1, 2)) for block in (crop, mask))
            if flip:
                crop, mask = crop[:, :, ::-1], mask[:, :, ::-1]
            crops.append(crop)
            masks.append(mask)
        batch = np.ascontiguousarray(np.stack(crops))
        return batch, (~np.stack(masks)).astype(np.float32) if with_mask else None


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


def load_training_images(images, normalizer: Normalizer, max_pixels: int,
                         planes_each_side: int = 0) -> list[np.ndarray]:
    """load_training_planes for several (data, layout) images fitted together: the pixel
    budget shared in proportion to their pixels, at least one plane of each."""
    images = list(images)
    sizes = np.array([layout.plane_count * layout.height * layout.width for _, layout in images], dtype=float)
    shares = [max_pixels if len(images) == 1 else int(max_pixels * size / sizes.sum()) for size in sizes]
    return [load_training_planes(data, layout, normalizer, share, planes_each_side)
            for (data, layout), share in zip(images, shares)]


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
