"""The facade: one object that fits, predicts, saves and loads. The widget, the CLI, the
benchmarks and the tests all go through it.

Pipeline: axes -> normalise -> sample patches -> fit -> tiled predict -> denormalise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .axes import PlaneLayout, guess_axes
from .config import FIT_PRESETS, NETWORK_PRESETS, FitConfig, NetworkConfig, TrainingSummary, network_preset
from .devices import out_of_memory_error, resolve_device
from .image_io import release_pages
from .model_io import ModelFileError, load_model, save_model
from .network import TBSN
from .noise import NoiseCorrelation, NoiseMeasurement, NoiseModel, measure_correlation, pd_down, pd_up
from .normalization import Normalizer
from .patches import PatchSampler, check_finite, fitting_patch_size, load_training_planes
from .lattice import LATTICE_PATCHES, LatticeFilter, fit_lattice_filter, residual_weight
from .posterior import (
    HEAD_PATCHES,
    NoiseTerms,
    blind_spot_estimate,
    fit_variance_head,
    posterior_estimate,
    split_output,
)
from .progress import drive
from .tiling import TiledPredictor, round_up
from .training import FitProgress, Trainer

__all__ = ["Denoiser", "FitProgress", "PredictProgress", "PredictionCancelled", "QualityEstimate"]

MAX_PD = 8
ESTIMATORS = ("posterior", "blind_spot")
# R3 (AP-BSN): each round swaps this fraction of the denoised pixels back to the noisy ones and
# runs the network at full resolution; the rounds are averaged.
R3_FRACTION = 0.16
R3_ROUNDS = 8
# ensemble="auto" averages the x8 flips and rotations for pixel-independent noise on inputs up to
# this many pixels, where 8x the prediction time stays small next to the fit (D1, 512x512:
# +0.15 dB for 5 s -> 44 s on a 2-core CPU), and predicts once for larger data.
AUTO_ENSEMBLE_PIXELS = 2**19
# A given camera model whose variance the data's measured noise misses by more than this factor
# (either way) draws a warning: a gain in electrons instead of input units, or a wrong baseline.
CALIBRATION_MISMATCH = 1.5
# The quality estimate's PSNR range: robust percentiles of the output (its extremes carry
# residual noise; on D1 they overstate the clean range by 23%, the percentiles by 2%).
RANGE_PERCENTILE = 0.1


class PredictionCancelled(RuntimeError):
    """Raised by predict when cancel() stopped it; planes already written stay written."""


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
        if self.mse <= 0:
            return float("inf")
        return float(10 * np.log10(self.data_range**2 / self.mse))

    def describe(self) -> str:
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


def _warn_on_mismatch(ratios: tuple[float, ...]) -> None:
    """Warn where the data's measured noise is far from a given (calibrated) noise model."""
    for channel, ratio in enumerate(ratios):
        if not 1 / CALIBRATION_MISMATCH <= ratio <= CALIBRATION_MISMATCH:
            where = f" in channel {channel}" if len(ratios) > 1 else ""
            warnings.warn(
                f"the noise measured on the data{where} is {ratio:.2g}x the variance of the given camera "
                "model: check the gain, read noise and baseline and their units (input units per photon, "
                "input units), or leave them out to estimate the noise from the data",
                stacklevel=4,
            )


def _noise_terms(noise_model: NoiseModel, normalizer: Normalizer, device: torch.device) -> NoiseTerms:
    """The noise model in the network's normalised units."""
    return NoiseTerms.of(*noise_model.normalized(np.asarray(normalizer.low), normalizer.scale), device)


def _checked_ensemble(ensemble):
    if ensemble not in (1, 8, "auto"):
        raise ValueError(f"ensemble must be 1 (off), 8 (flips and rotations) or 'auto', got {ensemble!r}")
    return ensemble


def check_data(data) -> None:
    """Reject what cannot be denoised, where it enters, with the fix in the message."""
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        raise TypeError(f"expected an array (numpy, dask, zarr, memmap), got {type(data).__name__}")
    dtype = np.dtype(data.dtype)
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise TypeError(
            f"cannot denoise data of dtype {dtype}; convert it to a real-valued type first, "
            "e.g. data.astype(numpy.float32)"
        )
    if len(data.shape) < 2:
        raise ValueError(f"expected at least a 2D image, got shape {tuple(data.shape)}")


class Denoiser:
    """Self-supervised TBSN denoiser for N-D microscopy stacks.

    >>> denoiser = Denoiser(preset="small").fit(stack, axes="ZYX", time_budget=300)
    >>> clean = denoiser.predict(stack, axes="ZYX")
    """

    def __init__(
        self,
        preset: str = "small",
        pd: int | str = "auto",
        device: str | torch.device = "auto",
        seed: int = 0,
        *,
        estimator: str = "posterior",
        fit_config: FitConfig | None = None,
        tile_size: int = 768,
        tile_overlap: int = 256,
        predict_batch_size: int = 4,
        ensemble: int | str = "auto",
        refine: int = R3_ROUNDS,
        context: int | str = "auto",
        lattice: bool = True,
        noise_model: NoiseModel | None = None,
    ) -> None:
        """`pd`: "auto" (measure the noise correlation at fit time), 1 for pixel-independent
        noise, 2-8 for spatially correlated noise. `estimator`: "posterior" (noise model + blind
        spot, pixel-independent noise) or "blind_spot" (the plain blind-spot mean). `refine`:
        R3 rounds at prediction when pd > 1 (0 turns R3 off). `context`: neighbouring planes on
        each side (along Z, else T) that the network sees whole beside the blind plane; "auto"
        takes 1 for Z-stacks and 0 otherwise. `ensemble`: 8 averages the prediction over
        flips and 90-degree rotations (8x the time), 1 does not, "auto" takes 8 for inputs up to
        AUTO_ENSEMBLE_PIXELS. `lattice`: for pixel-independent noise, fit a small linear filter
        that corrects the network's mean from the noisy pixels its dilated blind spot skips
        (see lattice.py); False keeps the network's own mean. `noise_model`: a calibrated camera
        model (NoiseModel.from_camera) to use instead of estimating one from the data."""
        if preset not in NETWORK_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(NETWORK_PRESETS)}")
        if pd != "auto" and (isinstance(pd, bool) or not isinstance(pd, int) or not 1 <= pd <= MAX_PD):
            raise ValueError(
                f"pd must be 'auto' or an integer from 1 to {MAX_PD} (1 for pixel-independent noise), got {pd!r}"
            )
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not isinstance(refine, int) or refine < 0:
            raise ValueError(f"refine must be a whole number of R3 rounds (0 for none), got {refine!r}")
        if context != "auto" and (isinstance(context, bool) or not isinstance(context, int) or not 0 <= context <= 3):
            raise ValueError(f"context must be 'auto' or 0 to 3 planes on each side, got {context!r}")
        if noise_model is not None and not isinstance(noise_model, NoiseModel):
            raise TypeError(f"noise_model must be a NoiseModel (see NoiseModel.from_camera) or None, got {noise_model!r}")
        self.preset = preset
        self.given_noise_model = noise_model
        self.context: int | str = context
        self.lattice = bool(lattice)
        self.pd: int | str = pd
        self.estimator = estimator
        self.refine = refine
        self.device = resolve_device(device)
        self.seed = seed
        self.fit_config = fit_config or FIT_PRESETS[preset]
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.predict_batch_size = predict_batch_size
        self.ensemble: int | str = _checked_ensemble(ensemble)
        self.network: TBSN | None = None
        self.normalizer: Normalizer | None = None
        self.axes: str | None = None
        self.summary: TrainingSummary | None = None
        self.noise_model: NoiseModel | None = None
        self.noise_measurement: NoiseMeasurement | None = None  # the measured points it was fitted to
        self.lattice_filter: LatticeFilter | None = None
        self.noise_correlation: NoiseCorrelation | None = None
        self.quality: QualityEstimate | None = None  # of the last prediction
        self._noise_terms: NoiseTerms | None = None
        self._cancel = threading.Event()
        self._trainer: Trainer | None = None

    # -- state -------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.network is not None and self.normalizer is not None

    @property
    def network_config(self) -> NetworkConfig | None:
        return None if self.network is None else self.network.config

    @property
    def predicts_posterior(self) -> bool:
        """Whether the network predicts a prior variance beside its mean (posterior-capable)."""
        return self.network is not None and self.network.config.variance_head

    @property
    def context_planes(self) -> int:
        """Neighbouring planes on each side that the fitted network reads."""
        return 0 if self.network is None else self.network.config.context_planes

    def _context_for(self, layout: PlaneLayout) -> int:
        if self.context == "auto":
            # Measured at 300 s: +0.9 dB on a nuclei Z-stack, none on a time-lapse whose frames move.
            return 1 if layout.context_axis == "Z" else 0
        return int(self.context)

    @staticmethod
    def _check_context_axis(planes: int, layout: PlaneLayout, fix: str) -> None:
        if planes and layout.context_axis is None:
            raise ValueError(
                f"this model reads {planes} neighbouring plane(s) on each side, but axes {layout.axes!r} "
                f"have no Z or T axis with several planes; {fix}"
            )

    def describe_noise(self) -> str:
        """The fitted noise model, the measured correlation and the pd and output used."""
        if self.noise_model is None or self.noise_correlation is None:
            return "no noise model (fit first)"
        output = "posterior" if self.uses_posterior else "blind-spot mean"
        fit = ""
        if self.noise_model.given and self.noise_measurement is not None:
            ratios = ", ".join(f"{r:.2f}" for r in self.noise_measurement.model_ratio(self.noise_model))
            fit = f"; the noise measured on the data is {ratios}x that"
        return (f"noise model (input units): {self.noise_model.describe()}{fit}; {self.noise_correlation.describe()}; "
                f"used pd {self.pd}, {output} output")

    @property
    def predict_pd(self) -> int:
        """Pixel-shuffle factor at inference: a smaller one than for training (AP-BSN)."""
        return 1 if self.pd == "auto" else min(int(self.pd), 2)

    def cancel(self) -> None:
        """Stop a running fit (within one iteration, keeping the best weights) or predict."""
        self._cancel.set()
        if self._trainer is not None:
            self._trainer.cancel()

    # -- fitting -----------------------------------------------------------------------
    def fit(
        self,
        data,
        axes: str,
        iterations: int | None = None,
        time_budget: float | None = None,
        callback: Callable[[FitProgress], None] | None = None,
    ) -> "Denoiser":
        """Fit (or fine-tune, after load) the network to the noisy `data` itself."""
        return drive(self.fit_iter(data, axes, iterations, time_budget), callback)

    def fit_iter(
        self,
        data,
        axes: str,
        iterations: int | None = None,
        time_budget: float | None = None,
    ) -> Generator[FitProgress, None, "Denoiser"]:
        """fit() as a generator that yields progress after every iteration (for GUIs)."""
        check_data(data)
        layout = PlaneLayout.of(data.shape, axes)
        if iterations is not None and iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        if time_budget is not None and time_budget <= 0:
            raise ValueError(f"time_budget must be positive seconds, got {time_budget}")
        if self.network is not None and self.network.config.in_channels != layout.channels:
            raise ValueError(
                f"this model has {self.network.config.in_channels} channel(s) but the data has "
                f"{layout.channels}; fit a new Denoiser for this data"
            )
        self._cancel.clear()
        smallest = network_preset(self.preset).size_multiple
        if min(layout.height, layout.width) < smallest:
            raise ValueError(
                f"the image is {layout.height}x{layout.width} pixels; fitting the {self.preset} preset needs "
                f"at least {smallest}x{smallest} (choose the tiny preset, or a larger image)"
            )
        normalizer = Normalizer.from_data(data, layout)
        measurement = NoiseMeasurement.of(data, layout)
        if self.given_noise_model is not None:
            noise_model = self.given_noise_model.for_channels(layout.channels)
            _warn_on_mismatch(measurement.model_ratio(noise_model))
        else:
            noise_model = NoiseModel.fit(measurement)
        correlation = measure_correlation(data, layout)
        pd = correlation.pd if self.pd == "auto" else int(self.pd)
        if pd == 1 and correlation.correlated:
            warnings.warn(
                f"the {correlation.describe()}; with pd=1 the "
                "network learns to copy correlated noise: use pd='auto' (or the suggested pd)",
                stacklevel=3,
            )
        network = self.network
        if network is None:
            posterior = self.estimator == "posterior" and pd == 1
            context = self._context_for(layout)
            torch.manual_seed(self.seed)
            config = network_preset(
                self.preset, layout.channels, variance_head=posterior, context_channels=2 * context * layout.channels
            )
            network = TBSN(config)
        context = network.config.context_planes
        self._check_context_axis(context, layout, "fit a new Denoiser with context=0")
        posterior = network.config.variance_head
        if posterior and pd != 1:
            raise ValueError(
                f"this model predicts a posterior, which needs pixel-independent noise (pd 1), but "
                f"pd is {pd}; fit a new Denoiser for spatially correlated noise"
            )
        terms = _noise_terms(noise_model, normalizer, self.device)
        network.to(self.device)
        granularity = network.size_multiple * pd
        patch = fitting_patch_size(
            max(self.fit_config.patch_size, granularity), layout.height, layout.width, granularity
        )
        planes = load_training_planes(data, layout, normalizer, self.fit_config.max_training_pixels, context)
        rng = np.random.default_rng(self.seed)
        sampler = PatchSampler(
            planes, patch, self.fit_config.validation_fraction, self.fit_config.validation_patches_max, rng
        )
        self._trainer = Trainer(network, sampler, self.fit_config, self.device, pd, self.seed)
        if self._cancel.is_set():  # cancel() arrived while the data loaded
            self._trainer.cancel()
        try:
            self.summary = yield from self._trainer.run(iterations, time_budget)
        except torch.OutOfMemoryError as error:
            raise out_of_memory_error(self.device, "fitting") from error
        finally:
            self._trainer = None
        if posterior:
            patches = torch.from_numpy(sampler.sample(rng, HEAD_PATCHES))
            self.summary.variance_head_loss = fit_variance_head(network, patches, terms)
        self.lattice_filter = None
        if self.lattice and pd == 1:
            patches = torch.from_numpy(sampler.sample(rng, LATTICE_PATCHES))
            self.lattice_filter = fit_lattice_filter(network, patches, terms)
        self.network = network
        self.normalizer = normalizer
        self.axes = layout.axes
        self.pd = pd
        self.noise_model = noise_model
        self.noise_measurement = measurement
        self.noise_correlation = correlation
        self._noise_terms = None
        return self

    # -- prediction --------------------------------------------------------------------
    def _noise(self) -> NoiseTerms | None:
        if self._noise_terms is None and self.noise_model is not None and self.normalizer is not None:
            self._noise_terms = _noise_terms(self.noise_model, self.normalizer, self.device)
        return self._noise_terms

    @property
    def uses_posterior(self) -> bool:
        """Whether predict returns the posterior mean (else the plain blind-spot mean)."""
        return self.estimator == "posterior" and self.predicts_posterior and self.noise_model is not None

    def _run_network(self, batch: torch.Tensor, views: int = 1, inside: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) noisy tile -> (B, 3C, h, w): estimate, posterior variance and squared-error
        estimate of the network's mean and prior averaged over `views` (1, or 8 for the x8
        self-ensemble). `inside` marks the tile's image pixels against its reflected padding."""
        channels = self.network.config.in_channels
        noisy = batch[:, :channels]  # then the context planes, if any
        mean, prior = self._averaged_output(batch, views)
        noise = self._noise()
        if self.lattice_filter is not None and self.pd == 1:  # its lattice is pd 1's blind spot
            weight = residual_weight(prior, noise.variance(mean) if noise is not None else None)
            mean = self.lattice_filter.apply(mean, noisy, weight, inside)
            prior = self.lattice_filter.scale_prior(prior) if prior is not None else None
        if self.uses_posterior:
            estimate = posterior_estimate(mean, prior, noisy, noise)
        else:
            # With correlated noise (pd > 1) the blind-spot residual says nothing about the error.
            estimate = blind_spot_estimate(mean, noisy, noise if self.pd == 1 else None)
        variance = estimate.variance if estimate.variance is not None else torch.zeros_like(estimate.value)
        return torch.cat([estimate.value, variance, estimate.squared_error.nan_to_num(0.0)], dim=1)

    def _averaged_output(self, batch: torch.Tensor, views: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's mean and prior variance (None without a variance head), averaged over
        the x8 self-ensemble when `views` is 8: every flip and 90-degree rotation, each undone."""
        if views == 1:
            return self._view_output(batch)
        means, priors = [], []
        for rotations in range(4):
            for flip in (False, True):
                view = torch.rot90(batch, rotations, dims=(-2, -1))
                view = view.flip(-1) if flip else view
                for results, result in zip((means, priors), self._view_output(view)):
                    if result is not None:
                        result = result.flip(-1) if flip else result
                        results.append(torch.rot90(result, -rotations, dims=(-2, -1)))
        return torch.stack(means).mean(0), torch.stack(priors).mean(0) if priors else None

    def _forward(self, batch: torch.Tensor, factor: int) -> torch.Tensor:
        assert self.network is not None
        # bfloat16 on CUDA; CPUs predict in float32, where tiles reproduce the whole image.
        fast = self.fit_config.mixed_precision and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=fast):
            return pd_up(self.network(pd_down(batch, factor)), factor).float()

    def _view_output(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One view's mean (R3-refined for pd > 1) and prior variance (None without a head)."""
        assert self.network is not None
        output = self._forward(batch, self.predict_pd)
        if self.network.config.variance_head:
            return split_output(output)
        mean = output[:, : self.network.config.in_channels]
        if self.pd != 1 and self.refine:
            mean = self._refine(mean, batch)
        return mean, None

    def _refine(self, denoised: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """R3 (AP-BSN): average full-resolution passes over the denoised image with a random
        R3_FRACTION of its pixels put back to their noisy values. Seeded: predictions repeat."""
        generator = torch.Generator().manual_seed(self.seed)
        channels = denoised.shape[1]
        noisy, context = noisy[:, :channels], noisy[:, channels:]
        total = torch.zeros_like(denoised)
        for _ in range(self.refine):
            keep_noisy = (torch.rand(noisy.shape, generator=generator) < R3_FRACTION).to(noisy.device)
            mixed = torch.cat([torch.where(keep_noisy, noisy, denoised), context], dim=1)
            total += self._forward(mixed, 1)[:, :channels]
        return total / self.refine

    def _predictor(self, views: int = 1) -> TiledPredictor:
        assert self.network is not None
        run = functools.partial(self._run_network, views=views)
        granularity = self.network.size_multiple * self.predict_pd
        overlap = min(self.tile_overlap, self.tile_size // 2)
        # Tiles start on the network's grid, so a tile must exceed its overlap by a grid step.
        tile = max(granularity, (self.tile_size // granularity) * granularity, round_up(overlap + granularity, granularity))
        return TiledPredictor(run, granularity, tile, overlap, self.predict_batch_size, self.device, self.predict_pd)

    def ensemble_size(self, shape: tuple[int, ...], ensemble: int | str | None = None) -> int:
        """How many flipped and rotated views predict averages for data of this shape, with
        `ensemble` (default: this Denoiser's setting)."""
        ensemble = self.ensemble if ensemble is None else _checked_ensemble(ensemble)
        if ensemble != "auto":
            return int(ensemble)
        # Measured with pixel-independent noise; with pd > 1, R3 already averages 8 passes.
        return 8 if self.pd == 1 and math.prod(shape) <= AUTO_ENSEMBLE_PIXELS else 1

    def minimum_size(self) -> int:
        """The smallest H and W that predict accepts."""
        if self.network is None:
            return network_preset(self.preset).size_multiple * self.predict_pd
        return self.network.size_multiple * self.predict_pd

    def predict(
        self,
        data,
        axes: str | None = None,
        out=None,
        callback: Callable[[PredictProgress], None] | None = None,
        uncertainty=None,
        ensemble: int | str | None = None,
    ):
        """Denoise `data` plane by plane; float32 in the input's units, same shape.

        `data` may be any array with numpy slicing (numpy, memmap, dask, zarr); it is read
        one plane at a time. With `out` (same shape, any array that accepts assignment) the
        result is written there and `out` is returned. With `uncertainty` (an array like
        `out`) the posterior standard deviation is written there too. Afterwards `quality`
        holds the estimated error of the result (None where it cannot be estimated).
        `ensemble` (1, 8 or "auto") overrides this Denoiser's setting for this call only.
        """
        return drive(self.predict_iter(data, axes, out, uncertainty, ensemble), callback)

    def predict_iter(
        self, data, axes: str | None = None, out=None, uncertainty=None, ensemble: int | str | None = None
    ) -> Generator[PredictProgress, None, Any]:
        """predict() as a generator that yields progress after every batch of tiles."""
        if not self.is_fitted:
            raise RuntimeError("this Denoiser has not been fitted yet: call fit() or Denoiser.load() first")
        assert self.network is not None and self.normalizer is not None
        check_data(data)
        if axes is None:
            axes = self.axes if self.axes is not None and len(self.axes) == len(data.shape) else guess_axes(data.shape)
        layout = PlaneLayout.of(data.shape, axes)
        if layout.channels != self.network.config.in_channels:
            raise ValueError(
                f"the model was fitted on {self.network.config.in_channels} channel(s), the data has "
                f"{layout.channels} (axes {layout.axes!r}); check the axes"
            )
        self._check_context_axis(self.context_planes, layout, "check the axes")
        if min(layout.height, layout.width) < self.minimum_size():
            raise ValueError(
                f"the image is {layout.height}x{layout.width} pixels; this model needs at least "
                f"{self.minimum_size()}x{self.minimum_size()}"
            )
        if out is None:
            out = np.empty(tuple(data.shape), dtype=np.float32)
        elif tuple(out.shape) != tuple(data.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(data.shape)}")
        if uncertainty is not None:
            if not self.uses_posterior:
                raise ValueError(
                    "an uncertainty map needs the posterior estimator (a model fitted with "
                    "estimator='posterior' on pixel-independent noise)"
                )
            if tuple(uncertainty.shape) != tuple(data.shape):
                raise ValueError(f"uncertainty has shape {tuple(uncertainty.shape)}, expected {tuple(data.shape)}")
        self._cancel.clear()
        self.quality = None
        estimable = self.noise_model is not None and self.pd == 1
        squared_error_sum, pixels = 0.0, 0
        low_value, high_value = np.inf, -np.inf
        self.network.to(self.device).eval()
        predictor = self._predictor(self.ensemble_size(tuple(data.shape), ensemble))
        planes = layout.plane_count
        start = time.perf_counter()
        for number, plane in enumerate(layout.plane_indices()):
            block = layout.read_plane_with_context(data, plane, self.context_planes)
            check_finite(block, f"plane {plane} of the input")
            steps = predictor.predict_iter(self.normalizer.normalize(block))
            try:
                while True:
                    done, total = next(steps)
                    if self._cancel.is_set():
                        raise PredictionCancelled("prediction stopped by cancel()")
                    fraction = (number + done / total) / planes
                    elapsed = time.perf_counter() - start
                    eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
                    yield PredictProgress(number, planes, done, total, elapsed, eta, fraction)
            except StopIteration as finished:
                result = finished.value
            except torch.OutOfMemoryError as error:
                raise out_of_memory_error(self.device, "denoising") from error
            channels = layout.channels
            denoised = self.normalizer.denormalize(result[:channels])
            layout.write_plane(out, plane, denoised)
            scale = self.normalizer.scale.reshape(-1, 1, 1)
            if uncertainty is not None:
                standard_deviation = np.sqrt(np.maximum(result[channels : 2 * channels], 0)) * scale
                layout.write_plane(uncertainty, plane, standard_deviation)
                release_pages(uncertainty)
            squared_error_sum += float(np.sum(result[2 * channels :] * scale**2, dtype=np.float64))
            pixels += denoised.size
            low, high = np.percentile(denoised, [RANGE_PERCENTILE, 100 - RANGE_PERCENTILE])
            low_value, high_value = min(low_value, float(low)), max(high_value, float(high))
            release_pages(data)
            release_pages(out)
        if estimable and pixels:
            self.quality = QualityEstimate(squared_error_sum / pixels, high_value - low_value)
        return out

    # -- model files -------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Everything saved beside the weights."""
        if not self.is_fitted:
            raise RuntimeError("nothing to save: fit() the Denoiser first")
        assert self.network is not None and self.normalizer is not None
        return {
            "preset": self.preset,
            "network": self.network.config.to_dict(),
            "channels": self.network.config.in_channels,
            "normalization": self.normalizer.to_dict(),
            "axes": self.axes,
            "pd": self.pd,
            "estimator": self.estimator,
            "refine": self.refine,
            "lattice_filter": self.lattice_filter.to_dict() if self.lattice_filter else None,
            "noise_model": self.noise_model.to_dict() if self.noise_model else None,
            "noise_measurement": self.noise_measurement.to_dict() if self.noise_measurement else None,
            "noise_correlation": self.noise_correlation.to_dict() if self.noise_correlation else None,
            "seed": self.seed,
            "fit": self.fit_config.to_dict(),
            "tiling": {"tile_size": self.tile_size, "tile_overlap": self.tile_overlap, "ensemble": self.ensemble},
            "training": dataclasses.asdict(self.summary) if self.summary else None,
            "package_version": __version__,
        }

    def save(self, path: str | Path) -> Path:
        """Write weights (safetensors) and description (JSON header) atomically to `path`."""
        description = self.describe()
        assert self.network is not None
        return save_model(path, self.network.state_dict(), description)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto") -> "Denoiser":
        state, description = load_model(path)
        try:
            config = NetworkConfig.from_dict(description["network"])
            denoiser = cls(
                preset=description.get("preset", "small"),
                pd=int(description.get("pd", 1)),
                estimator=description.get("estimator", "blind_spot"),
                refine=int(description.get("refine", R3_ROUNDS)),
                lattice=description.get("lattice_filter") is not None,
                device=device,
                seed=int(description.get("seed", 0)),
                fit_config=FitConfig.from_dict(description.get("fit", {})),
                **description.get("tiling", {}),
            )
            network = TBSN(config)
            network.load_state_dict(state, strict=True)
            normalizer = Normalizer.from_dict(description["normalization"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ModelFileError(f"{path} does not describe a usable TBSN model: {error}") from error
        denoiser.network = network.to(denoiser.device).eval()
        denoiser.normalizer = normalizer
        try:
            noise = description.get("noise_model")
            denoiser.noise_model = NoiseModel.from_dict(noise) if noise else None
            if denoiser.noise_model is not None and denoiser.noise_model.given:
                denoiser.given_noise_model = denoiser.noise_model  # fine-tuning keeps the calibration
            measurement = description.get("noise_measurement")  # older files have none
            denoiser.noise_measurement = NoiseMeasurement.from_dict(measurement) if measurement else None
            correlation = description.get("noise_correlation")
            denoiser.noise_correlation = NoiseCorrelation(tuple(correlation["by_lag"])) if correlation else None
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"{path} has an unreadable noise model: {error}") from error
        try:
            lattice = description.get("lattice_filter")
            denoiser.lattice_filter = LatticeFilter.from_dict(lattice) if lattice else None
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"{path} has an unreadable lattice filter: {error}") from error
        denoiser.axes = description.get("axes")
        training = description.get("training")
        denoiser.summary = TrainingSummary(**training) if training else None
        return denoiser
