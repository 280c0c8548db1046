"""Tiled prediction with a fitted model: plane by plane, tile by tile, exactly blind.

Per tile: the network's mean and prior variance (averaged over the x8 self-ensemble when
asked, R3-refined for correlated noise), the lattice filter's correction, then the posterior
(or the plain blind-spot mean) and an estimate of its squared error.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import threading
import time
import warnings
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .axes import PlaneLayout, Region
from .camera import CameraCorrection, CorrectedStack, decides_on_itself
from .errors import BadInput
from .config import MIN_TILE_SIZE, PredictOptions
from .devices import TILE_MEMORY_SHARE, OutOfMemory, autocast_dtype, free_memory, out_of_memory_error, tile_for_memory
from .image_io import release_pages
from .lattice import residual_weight
from .model import FittedModel
from .noise import pd_down, pd_up
from .patches import check_finite
from .posterior import blind_spot_estimate, posterior_estimate, split_output
from .progress import PredictionCancelled, raise_if_cancelled, remaining_seconds
from .tiling import MarginTiledPredictor, TiledPredictor, round_up

# R3 (AP-BSN): each round swaps this fraction of the denoised pixels back to the noisy ones and
# runs the network at full resolution; the rounds are averaged.
R3_FRACTION = 0.16
# ensemble="auto" averages the x8 flips and rotations for pixel-independent noise on inputs up to
# this many pixels, where 8x the prediction time stays small next to the fit (D1, 512x512:
# +0.15 dB for 5 s -> 44 s on a 2-core CPU), and predicts once for larger data.
AUTO_ENSEMBLE_PIXELS = 2**19
# The quality estimate's PSNR range: robust percentiles of the output (its extremes carry
# residual noise; on D1 they overstate the clean range by 23%, the percentiles by 2%).
RANGE_PERCENTILE = 0.1
# Peak host memory of one pass per pixel of tile, measured on CPU (float32, variance head on):
# the TBSN about 180 bytes per channel of its first level (tiny 1.4 kB, small 3.4-4.4 kB, paper
# 8.9 kB); the small student 0.5 kB.
TEACHER_BYTES_PER_PIXEL_PER_DIM = 180
STUDENT_BYTES_PER_PIXEL_PER_WIDTH = 16


@dataclass(frozen=True)
class QualityEstimate:
    """How good the last prediction is, estimated without clean data: the mean squared error
    (input units) from the noise model and the blind spot, and the PSNR it implies over the
    output's range (0.1 to 99.9 percentile), standing in for the clean data's range.

    Whatever the noise model counts as noise, the estimate counts as error: fine grain that
    is part of the true image but looks like pixel noise makes it optimistic."""

    mse: float
    data_range: float

    @property
    def rmse(self) -> float:
        return float(np.sqrt(max(self.mse, 0.0)))

    @property
    def psnr(self) -> float:
        if self.mse <= 0 or self.data_range <= 0:
            return float("nan")
        return float(10 * np.log10(self.data_range**2 / self.mse))

    def describe(self) -> str:
        if not math.isfinite(self.psnr):
            return "no PSNR estimate (the output is flat or the estimated error is zero)"
        return f"estimated PSNR {self.psnr:.2f} dB (RMSE {self.rmse:.4g}), from the noisy data alone"


@dataclass(frozen=True)
class PredictProgress:
    plane: int
    planes: int
    tile: int
    tiles: int
    elapsed: float
    eta: float | None
    fraction: float


def ensemble_size(pd: int, options: PredictOptions, shape: tuple[int, ...]) -> int:
    """How many flipped and rotated views a prediction at `pd` of data of this shape averages."""
    if options.ensemble != "auto":
        return int(options.ensemble)
    if pd > 1:  # R3 averages its own passes; without it, the ensemble takes R3's place (config.R3_ROUNDS)
        return 1 if options.refine else 8
    return 8 if math.prod(shape) <= AUTO_ENSEMBLE_PIXELS else 1  # measured with pixel-independent noise


def uses_student(model: FittedModel, options: PredictOptions) -> bool:
    """Whether the student predicts: student True where the model has one, "auto" where its
    check against the teacher did not find it worse (distillation.check_student)."""
    if model.student is None or options.student is False:
        return False
    return options.student is True or model.student.preferred


def uses_posterior(model: FittedModel, options: PredictOptions, camera: CameraCorrection | None = None) -> bool:
    """Whether the output is the posterior: asked for, fitted, not the student's, and not on
    data whose fixed pattern was measured on the data itself (camera.py: the posterior would
    trust each pixel's own value, whose offset is then known only to the planes' noise)."""
    return (options.estimator == "posterior" and model.predicts_posterior and not uses_student(model, options)
            and not (camera is not None and camera.pattern is not None))


def on_device(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`network` in eval mode on `device`: itself where it is there, else a copy (the shared
    model is never moved)."""
    if needs_move(next(network.parameters()).device, device):
        network = copy.deepcopy(network).to(device)
    return network.eval()


def needs_move(held: torch.device, device: torch.device) -> bool:
    """Whether a network on `held` must be copied to run on `device`. A device without an
    index ("cuda") means the current one, where the inputs go: a network on cuda:1 does not run
    there when the current device is cuda:0."""
    if held.type != device.type:
        return True
    if device.index is None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device.index is not None and device.index != held.index


def prediction_precision(device: torch.device, mixed_precision: bool = True) -> torch.dtype | None:
    """bfloat16 where the device has fast bfloat16 units (CUDA from Ampere on, CPUs with AMX or
    AVX512-BF16), unless the model is fitted without `mixed_precision`; float32 (None) elsewhere,
    and on older GPUs, whose float16 could overflow with no loss scale to catch it. On the CPU
    bfloat16 prediction measured D1 (x8 ensemble) 31.088 -> 31.082 dB in 0.6x the time
    (docs/measurements.md); float64 networks are never cast (autocast leaves float64 alone)."""
    return torch.bfloat16 if mixed_precision and autocast_dtype(device) == torch.bfloat16 else None


def prediction_autocast(model: FittedModel | None, device: torch.device) -> torch.dtype | None:
    """prediction_precision for `model` (None: one fitted with the defaults)."""
    return prediction_precision(device, model is None or model.fit_config.mixed_precision)


class TileModel:
    """What runs on one batch of tiles: (B, C [+ context], h, w) noisy, normalised -> (B, 3C, h, w):
    the estimate, its posterior variance (zero for the plain mean) and its squared-error estimate."""

    def __init__(self, model: FittedModel, options: PredictOptions, device: torch.device, views: int,
                 cancel: threading.Event | None = None, camera: CameraCorrection | None = None) -> None:
        self.model = model
        # Per-pixel camera maps follow the network's input channels in every batch (pixel_maps).
        self.camera = camera if camera is not None and camera.per_pixel else None
        self._maps: dict[object, np.ndarray] = {}  # pixel_maps by the decisions they take (decision_key)
        # Line offsets are estimated on p's own lattice, which the lattice filter reads (camera.py)
        # unless its residuals are centred along those lines.
        self.lattice = (options.lattice and model.lattice_filter is not None and model.pd == 1
                        and model.lattice_filter.reads_blindly(camera.lines if camera is not None else ()))
        # A filter centred along the lines reads the plane before their offsets came out.
        self.unlined = self.lattice and camera is not None and bool(camera.lines)
        self.options = options
        self.device = device
        self.views = views
        self.cancel = cancel  # checked before every network pass: a stop waits for one pass at most
        self.network = on_device(model.network, device)
        self.posterior = uses_posterior(model, options, camera)
        self.noise = model.noise_terms(device) if model.noise_model is not None else None
        self.autocast = prediction_autocast(model, device)

    def pixel_maps(self, target: int) -> np.ndarray | None:
        """(2C, H, W) normalised camera maps to append to the plane of flat index `target`: where
        a pixel's value is never used, and its read variance above the typical pixel's. (Hot
        pixels are decided by planes other than the target: camera.hot_for.)"""
        if self.camera is None:
            return None
        key = self.camera.decision_key(target)
        if key not in self._maps:
            maps = self.camera.pixel_maps(self.model.channels, target)
            maps[self.model.channels:] /= self.model.normalizer.scale.reshape(-1, 1, 1) ** 2
            self._maps[key] = maps
        return self._maps[key]

    def extra_planes(self, data, layout: PlaneLayout, plane: tuple[int, ...]) -> np.ndarray | None:
        """(k, H, W) to follow the plane's normalised block in every batch: its camera maps
        (pixel_maps), then, for a lattice filter centred along the camera's lines, the plane
        before its line offsets came out (`data`: a CorrectedStack), normalised."""
        parts = []
        if self.camera is not None:
            parts.append(self.pixel_maps(layout.flat_index(plane)))
        if self.unlined:
            parts.append(self.model.normalizer.normalize(data.read_plane_without_lines(plane, self.model.context_planes)))
        return np.concatenate(parts) if parts else None

    def with_maps(self, normalized: np.ndarray, data, layout: PlaneLayout, plane: tuple[int, ...]) -> np.ndarray:
        """A plane's normalised block (C [+ context], H, W) with its extra_planes after it."""
        extra = self.extra_planes(data, layout, plane)
        return normalized if extra is None else np.concatenate([normalized, extra])

    def __call__(self, batch: torch.Tensor, inside: torch.Tensor | None = None) -> torch.Tensor:
        channels = self.model.channels
        network_channels = self.model.config.in_channels + self.model.config.context_channels
        maps_end = network_channels + (2 * channels if self.camera is not None else 0)
        batch, maps, unlined = batch[:, :network_channels], batch[:, network_channels:maps_end], batch[:, maps_end:]
        unusable, extra = maps.float().chunk(2, dim=1) if maps.shape[1] else (None, None)
        noisy = batch[:, :channels]  # then the context planes, if any
        mean, prior = self.averaged_output(batch)
        noise = self.noise.with_extra(extra) if self.noise is not None and extra is not None else self.noise
        if self.lattice:  # the lattice filter's lattice is pd 1's blind spot
            weight = residual_weight(prior, noise.variance(mean) if noise is not None else None)
            if unusable is not None:  # a hot pixel's residual would carry its replacement's lattice
                weight = weight * (1 - unusable)
            mean = self.model.lattice_filter.apply(mean, unlined if self.unlined else noisy, weight, inside, unusable)
            prior = self.model.lattice_filter.scale_prior(prior) if prior is not None else None
        if self.posterior and prior is not None:
            estimate = posterior_estimate(mean, prior, noisy, noise, unusable)
        else:
            # With correlated noise (pd > 1) the blind-spot residual says nothing about the error.
            estimate = blind_spot_estimate(mean, noisy, noise if self.model.pd == 1 else None, unusable)
        variance = estimate.variance if estimate.variance is not None else torch.zeros_like(estimate.value)
        return torch.cat([estimate.value, variance, estimate.squared_error.nan_to_num(0.0)], dim=1)

    def averaged_output(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's mean and prior variance (None without a fitted variance head), averaged
        over the x8 self-ensemble when `views` is 8: every flip and 90-degree rotation, each undone."""
        if self.views == 1:
            return self.view_output(batch)
        means, priors = [], []
        for rotations in range(4):
            for flip in (False, True):
                view = torch.rot90(batch, rotations, dims=(-2, -1))
                view = view.flip(-1) if flip else view
                for results, result in zip((means, priors), self.view_output(view)):
                    if result is not None:
                        result = result.flip(-1) if flip else result
                        results.append(torch.rot90(result, -rotations, dims=(-2, -1)))
        return torch.stack(means).mean(0), torch.stack(priors).mean(0) if priors else None

    def forward(self, batch: torch.Tensor, factor: int) -> torch.Tensor:
        raise_if_cancelled(self.cancel, PredictionCancelled, "prediction")
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            return pd_up(self.network(pd_down(batch, factor)), factor).float()

    def view_output(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One view's mean (R3-refined for pd > 1) and prior variance (None without a fitted head)."""
        output = self.forward(batch, self.model.predict_pd)
        if self.model.config.variance_head:
            mean, prior = split_output(output)
            return mean, (prior if self.model.variance_head_fitted else None)
        mean = output[:, : self.model.channels]
        if self.model.pd != 1 and self.options.refine:
            mean = self.refine(mean, batch)
        return mean, None

    def refine(self, denoised: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """R3 (AP-BSN): average full-resolution passes over the denoised image with a random
        R3_FRACTION of its pixels put back to their noisy values. Each tile's masks are seeded
        from the model's seed and the tile's own pixels, so a tile gets the same masks in any
        batch: predictions repeat, and a region of a plane equals the whole plane's there."""
        channels = denoised.shape[1]
        noisy, context = noisy[:, :channels], noisy[:, channels:]
        rounds = self.options.refine
        host = noisy.detach().float().cpu().numpy()  # one copy for the batch's seeds, not one per tile
        masks = torch.stack([self._r3_masks(tile, rounds) for tile in host], dim=1).to(noisy.device)
        total = torch.zeros_like(denoised)
        for keep_noisy in masks:
            mixed = torch.cat([torch.where(keep_noisy, noisy, denoised), context], dim=1)
            total += self.forward(mixed, 1)[:, :channels]
        return total / rounds

    def _r3_masks(self, tile: np.ndarray, rounds: int) -> torch.Tensor:
        """(rounds, C, h, w) bool: where each R3 round puts the noisy pixels of `tile` back."""
        digest = hashlib.blake2b(np.ascontiguousarray(tile).tobytes(), digest_size=7).digest()
        generator = torch.Generator().manual_seed(self.model.seed ^ int.from_bytes(digest, "little"))
        return torch.rand((rounds, *tile.shape), generator=generator) < R3_FRACTION

    @property
    def bytes_per_pixel(self) -> float:
        return TEACHER_BYTES_PER_PIXEL_PER_DIM * self.model.config.dim

    def tiled(self, tile_size: int) -> TiledPredictor:
        granularity = self.network.size_multiple * self.model.predict_pd
        overlap = min(self.options.tile_overlap, tile_size // 2)
        # Tiles start on the network's grid, so a tile must exceed its overlap by a grid step.
        tile = max(granularity, (tile_size // granularity) * granularity, round_up(overlap + granularity, granularity))
        batch = tiles_in_memory(tile, self.bytes_per_pixel, self.options, self.device)
        return TiledPredictor(self, granularity, tile, overlap, batch, self.device, self.model.predict_pd)

    def predict_iter(self, normalized, tile_size: int, region: Region | None = None):
        """(C [+ context], H, W) -> (3C, H, W): estimate, posterior variance, squared error
        (of the (rows, columns) `region` only, where one is given)."""
        return self.tiled(tile_size).predict_iter(normalized, region)


class StudentModel:
    """The distilled student on whole planes: (C [+ context], H, W) normalised -> (C, H, W)."""

    def __init__(self, model: FittedModel, device: torch.device, cancel: threading.Event | None = None) -> None:
        self.network = on_device(model.student.network, device)
        self.device = device
        self.cancel = cancel
        self.autocast = prediction_autocast(model, device)

    @property
    def bytes_per_pixel(self) -> float:
        return STUDENT_BYTES_PER_PIXEL_PER_WIDTH * self.network.config.width

    def core(self, window: torch.Tensor) -> torch.Tensor:
        raise_if_cancelled(self.cancel, PredictionCancelled, "prediction")
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            return self.network.core(window).float()

    def predict_iter(self, normalized, tile_size: int, region: Region | None = None):
        """`tile_size`: the pixels each window keeps; it reads `margin` more on each side."""
        network = self.network
        tiler = MarginTiledPredictor(self.core, network.padding, network.size_multiple, network.config.margin,
                                     tile_size, self.device)
        return tiler.predict_iter(normalized, region)




def as_predicted(model: FittedModel, camera_setting, layout: PlaneLayout) -> FittedModel:
    """The model as a prediction of `layout` under `camera_setting` runs it: where the image
    decides its own hot pixels (camera.decides_on_itself: a single plane under "auto", whatever
    it finds there), a lattice filter that reads the far ring, whose decisions hold p, reads none
    of it (LatticeFilter.far; the rest of its coefficients as fitted)."""
    lattice = model.lattice_filter
    if lattice is None or lattice.far or not decides_on_itself(camera_setting, layout):
        return model
    return dataclasses.replace(model, lattice_filter=dataclasses.replace(lattice, far=True))


def make_runner(model: FittedModel, options: PredictOptions, device: torch.device, views: int,
                cancel: threading.Event | None = None, camera: CameraCorrection | None = None) -> TileModel | StudentModel:
    """The student where there is one and options allow it, else the teacher with `views`."""
    if uses_student(model, options):
        return StudentModel(model, device, cancel)
    return TileModel(model, options, device, views, cancel, camera)


def tiles_in_memory(tile: int, bytes_per_pixel: float, options: PredictOptions, device: torch.device) -> int:
    """The batch of tiles: options.batch_size, fewer where their passes would not fit the
    memory share that sizes automatic tiles."""
    if options.tile_size != "auto":
        return options.batch_size
    fits = int(TILE_MEMORY_SHARE * free_memory(device) // (tile * tile * bytes_per_pixel))
    return max(1, min(options.batch_size, fits))


def tile_side(runner: TileModel | StudentModel, options: PredictOptions, device: torch.device,
              free: int | None = None) -> int:
    """options.tile_size, or for "auto" the largest tile a quarter of the free memory (`free`
    bytes, default: what `device` has free now) holds (for the student: the pixels a window
    keeps, inside its margins)."""
    if options.tile_size != "auto":
        return int(options.tile_size)
    side = tile_for_memory(runner.bytes_per_pixel, device, MIN_TILE_SIZE, free=free)
    if isinstance(runner, StudentModel):
        return max(MIN_TILE_SIZE, side - 2 * runner.network.config.margin)
    return side


def check_prediction_input(model: FittedModel, layout: PlaneLayout, out, uncertainty, options: PredictOptions) -> None:
    """Refuse what this model cannot predict, before any work, with the fix in the message."""
    if layout.channels != model.channels:
        raise ValueError(f"the model was fitted on {model.channels} channel(s), the data has {layout.channels} "
                         f"(axes {layout.axes!r}); check the axes")
    layout.check_context(model.context_planes, "check the axes, or fit a model with context 0")
    if min(layout.height, layout.width) < model.minimum_size:
        raise ValueError(f"the image is {layout.height}x{layout.width} pixels; this model needs at least "
                         f"{model.minimum_size}x{model.minimum_size}")
    for name, array in (("out", out), ("uncertainty", uncertainty)):
        if array is not None and tuple(array.shape) != layout.shape:
            raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {layout.shape}")
    if uncertainty is not None and uses_student(model, options):
        raise ValueError("an uncertainty map comes from the teacher, not the distilled student: "
                         "predict with student=False (--student off)")
    if uncertainty is not None and not uses_posterior(model, options):
        raise ValueError("an uncertainty map needs the posterior estimator (a model fitted with "
                         "estimator='posterior' on pixel-independent noise)")


class QualityTally:
    """Sums the squared-error estimate and the output's range over the planes of a prediction."""

    def __init__(self) -> None:
        self.squared_error, self.pixels = 0.0, 0
        self.low, self.high = np.inf, -np.inf

    def add(self, denoised: np.ndarray, squared_error: np.ndarray) -> None:
        self.squared_error += float(np.sum(squared_error, dtype=np.float64))
        self.pixels += denoised.size
        low, high = np.percentile(denoised, [RANGE_PERCENTILE, 100 - RANGE_PERCENTILE])
        self.low, self.high = min(self.low, float(low)), max(self.high, float(high))

    def estimate(self) -> QualityEstimate | None:
        return QualityEstimate(self.squared_error / self.pixels, self.high - self.low) if self.pixels else None


def check_uncertainty_possible(camera: CameraCorrection | None) -> None:
    """Refuse an uncertainty map where a fixed pattern measured on the stack itself rules out
    the posterior it comes from (uses_posterior)."""
    if camera is not None and camera.pattern is not None:
        raise BadInput("an uncertainty map needs the posterior, which a fixed pattern measured on the stack itself "
                       "rules out: give dark frames of the camera (--dark), or leave out the uncertainty map")


def predict_planes(
    model: FittedModel, options: PredictOptions, device: torch.device, data, layout: PlaneLayout, out,
    uncertainty, cancel: threading.Event, camera: CameraCorrection | None = None,
) -> Generator[PredictProgress, None, QualityEstimate | None]:
    """Denoise every plane of `data` into `out` (and `uncertainty`), yielding progress after
    every batch of tiles; returns the quality estimate (None where it cannot be estimated)."""
    if camera is not None:
        if uncertainty is not None:
            check_uncertainty_possible(camera)
        data = CorrectedStack(data, layout, camera)
    runner = make_runner(model, options, device, ensemble_size(model.pd, options, layout.shape), cancel, camera)
    tile_size = tile_side(runner, options, device)
    tally = QualityTally()
    channels = model.channels
    scale = model.normalizer.scale.reshape(-1, 1, 1)
    start = time.perf_counter()
    for number, plane in enumerate(layout.plane_indices()):
        raise_if_cancelled(cancel, PredictionCancelled, "prediction")
        block = layout.read_plane_with_context(data, plane, model.context_planes)
        check_finite(block, f"{layout.describe_plane(plane)} of the input")
        normalized = model.normalizer.normalize(block)
        if isinstance(runner, TileModel):
            normalized = runner.with_maps(normalized, data, layout, plane)
        while True:
            try:
                steps = runner.predict_iter(normalized, tile_size)
                result = yield from plane_steps(steps, cancel, number, layout.plane_count, start)
                break
            except OutOfMemory as error:
                tile_size = smaller_tile(tile_size, device, error)
        denoised = model.normalizer.denormalize(result[:channels])
        layout.write_plane(out, plane, denoised)
        if uncertainty is not None:
            layout.write_plane(uncertainty, plane, np.sqrt(np.maximum(result[channels : 2 * channels], 0)) * scale)
            release_pages(uncertainty)
        if len(result) == 3 * channels:  # the student gives no error estimate (it sees every pixel)
            tally.add(denoised, result[2 * channels :] * scale**2)
        release_pages(data)
        release_pages(out)
    return tally.estimate() if model.noise_model is not None and model.pd == 1 else None


def plane_steps(steps, cancel: threading.Event, number: int, planes: int, start: float):
    while True:
        raise_if_cancelled(cancel, PredictionCancelled, "prediction")
        try:
            done, total = next(steps)
        except StopIteration as finished:
            return finished.value
        raise_if_cancelled(cancel, PredictionCancelled, "prediction")
        fraction = (number + done / total) / planes
        elapsed = time.perf_counter() - start
        yield PredictProgress(number, planes, done, total, elapsed, remaining_seconds(elapsed, fraction), fraction)


def smaller_tile(tile_size: int, device: torch.device, error: Exception) -> int:
    """Half the tile after an out-of-memory error, down to MIN_TILE_SIZE, and say so."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if tile_size // 2 < MIN_TILE_SIZE:
        raise out_of_memory_error(device, "denoising, even with the smallest tile") from error
    warnings.warn(f"{device.type.upper()} ran out of memory with {tile_size}-pixel tiles; "
                  f"retrying this plane with {tile_size // 2}-pixel tiles", stacklevel=2)
    return tile_size // 2


def describe_model(model: FittedModel, options: PredictOptions) -> str:
    """Which network a prediction with these options runs, for status lines."""
    return "the distilled student (UNet)" if uses_student(model, options) else "the TBSN teacher"


def describe_output(model: FittedModel, options: PredictOptions) -> str:
    if uses_student(model, options):
        return "distilled student's"
    return "posterior" if uses_posterior(model, options) else "blind-spot mean"


__all__: list[Any] = ["PredictProgress", "QualityEstimate", "predict_planes", "TileModel"]
