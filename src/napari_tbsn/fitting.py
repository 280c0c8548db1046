"""Fitting a model to the user's noisy data, phase by phase, on a copy.

Phases: analyse the data (normalisation, noise model, noise correlation -> pd), load the
training planes, train the network, fit the prior-variance head (posterior) and the lattice
filter. Each phase reads the job's cancel token. The network trained is a new one or a copy
of the previous model's, so the previous model is never touched: a fit that fails, or that
is stopped while fine-tuning, leaves it exactly as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import warnings
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from .axes import PlaneLayout
from .camera import Calibration, CameraCorrection, CorrectedStack, camera_record, find_correction
from .channels import ChannelChoice, choose_channels
from .config import FitConfig, network_preset
from .ddp import world
from .devices import OutOfMemory, out_of_memory_error
from .lattice import LATTICE_PATCHES, fit_lattice_filter
from .model import FittedModel
from .network import TBSN
from .noise import NoiseCorrelation, NoiseMeasurement, NoiseModel, measure_correlation
from .normalization import Normalizer
from .patches import PatchSampler, channels_as_samples, fitting_patch_size, load_training_planes
from .posterior import HEAD_PATCHES, fit_variance_head
from .progress import CancellableArray, FitCancelled, raise_if_cancelled
from .training import FitProgress, Trainer, pass_horizon

# A given camera model whose variance the data's measured noise misses by more than this factor
# (either way) draws a warning: a gain in electrons instead of input units, or a wrong baseline.
CALIBRATION_MISMATCH = 1.5


@dataclass(frozen=True)
class FitSettings:
    """What a Denoiser fits with (fixed when it is made)."""

    preset: str
    pd: int | str  # "auto": measured
    context: int | str  # "auto": 1 for Z-stacks, else 0
    posterior: bool  # give the network a prior-variance head (pixel-independent noise)
    lattice: bool
    noise_model: NoiseModel | None  # a calibrated camera model, else estimated
    fit_config: FitConfig
    seed: int
    channels: str = "auto"  # "auto", "joint" or "independent" (channels.py)
    camera: str | Calibration = "auto"  # "auto": found in the data, "off", or a dark calibration


@dataclass(frozen=True)
class DataAnalysis:
    data: object  # what the fit reads: the input, or a view of it with the camera taken out
    camera: CameraCorrection | None
    normalizer: Normalizer
    measurement: NoiseMeasurement
    noise_model: NoiseModel
    correlation: NoiseCorrelation
    pd: int
    channels: ChannelChoice


def analyse(data, layout: PlaneLayout, settings: FitSettings, previous: FittedModel | None = None) -> DataAnalysis:
    """Normalisation, noise model and noise correlation of the data, and the pd and channel
    handling they call for (a fine-tune keeps the previous model's: its network was fitted so).
    The camera (camera.py) is found first, and everything after reads the data without it."""
    camera = camera_correction(settings.camera, data, layout)
    if camera is not None:
        data = CorrectedStack(data, layout, camera)
    normalizer = Normalizer.from_data(data, layout)
    measurement = NoiseMeasurement.of(data, layout)
    if settings.noise_model is not None:
        noise_model = settings.noise_model.for_channels(layout.channels)
        _warn_on_mismatch(measurement.model_ratio(noise_model))
    else:
        noise_model = NoiseModel.fit(measurement)
    correlation = measure_correlation(data, layout)
    pd = previous.pd if previous is not None else correlation.pd if settings.pd == "auto" else int(settings.pd)
    if camera is not None and pd != 1:  # lattice corrections assume pd 1's blind spot (camera.py)
        camera = camera.for_pd(pd)
        data = CorrectedStack(data.source, layout, camera) if camera.active else data.source
        camera = camera if camera.active else None
    if pd == 1 and correlation.correlated:
        warnings.warn(f"the {correlation.describe()}; with pd=1 the network learns to copy correlated noise: "
                      "use pd='auto' (or the suggested pd)", stacklevel=2)
    if previous is not None:
        channels = ChannelChoice(previous.channel_mode, reason="as the model was fitted")
    else:
        channels = choose_channels(settings.channels, data, layout, normalizer)
    return DataAnalysis(data, camera, normalizer, measurement, noise_model, correlation, pd, channels)


def camera_correction(setting: str | Calibration, data, layout: PlaneLayout, pd: int = 1) -> CameraCorrection | None:
    """The camera correction of `data` the setting asks for, for a model of pixel-shuffle
    factor `pd` (None: nothing to take out)."""
    if setting == "off":
        return None
    correction = find_correction(data, layout, setting if isinstance(setting, Calibration) else None).for_pd(pd)
    return correction if correction.active else None


def _warn_on_mismatch(ratios: tuple[float, ...]) -> None:
    """Warn where the data's measured noise is far from a given (calibrated) noise model."""
    for channel, ratio in enumerate(ratios):
        if not 1 / CALIBRATION_MISMATCH <= ratio <= CALIBRATION_MISMATCH:
            where = f" in channel {channel}" if len(ratios) > 1 else ""
            warnings.warn(
                f"the noise measured on the data{where} is {ratio:.2g}x the variance of the given camera "
                "model: check the gain, read noise and baseline and their units (input units per photon, "
                "input units), or leave them out to estimate the noise from the data",
                stacklevel=3,
            )


def context_for(settings: FitSettings, layout: PlaneLayout, previous: FittedModel | None = None) -> int:
    """Neighbouring planes on each side the fitted network will read. (A fixed pattern measured
    on the stack keeps its context: its maps for a plane and for the plane's context share no
    plane (camera.StackPattern); measured on C2, 300 iterations, context 1 gave 24.88 dB and
    context 0 23.92.)"""
    if previous is not None:
        return previous.context_planes
    if settings.context == "auto":
        # Measured at 300 s: +0.9 dB on a nuclei Z-stack, none on a time-lapse whose frames move.
        return 1 if layout.context_axis == "Z" and layout.context_length() >= 2 else 0
    return int(settings.context)



def starting_network(settings: FitSettings, layout: PlaneLayout, pd: int, previous: FittedModel | None,
                     independent: bool = False) -> TBSN:
    """A copy of the previous model's network to fine-tune, or a new one. (Denoiser.fit_iter has
    checked that the stack gives the context it reads.)"""
    if previous is not None:
        network = copy.deepcopy(previous.network)
    else:
        torch.manual_seed(settings.seed)
        context = context_for(settings, layout)
        network = TBSN(network_preset(settings.preset, layout.channels, variance_head=settings.posterior and pd == 1,
                                      context_channels=2 * context * layout.channels,
                                      channels_as_samples=independent))
    if network.config.variance_head and pd != 1:
        raise ValueError(f"this model predicts a posterior, which needs pixel-independent noise (pd 1), but pd is "
                         f"{pd}; fit a new model for spatially correlated noise")
    return network


def fit_model(
    settings: FitSettings, data, layout: PlaneLayout, iterations: int | None, time_budget: float | None,
    device: torch.device, cancel: threading.Event, previous: FittedModel | None = None,
    stop_training: threading.Event | None = None,
) -> Generator[FitProgress, None, FittedModel]:
    """Fit (or fine-tune `previous`) on `data`, yielding progress after every iteration.

    Returns the new model. `stop_training` ends the training early, and the fit completes with
    the best weights reached. `cancel` stops the whole job within a second: it raises
    FitCancelled where there is nothing worth keeping (before training reached any weights, or
    at any point of a fine-tune: the previous model stays); a first fit cancelled later keeps
    the best weights it reached, with the closing fits that had finished."""
    data = CancellableArray(data, cancel)  # every plane read checks the token
    analysis = analyse(data, layout, settings, previous)
    network = starting_network(settings, layout, analysis.pd, previous, analysis.channels.independent).to(device)
    config = settings.fit_config
    granularity = network.size_multiple * analysis.pd
    patch = fitting_patch_size(max(config.patch_size, granularity), layout.height, layout.width, granularity)
    planes = load_training_planes(analysis.data, layout, analysis.normalizer, config.max_training_pixels,
                                  network.config.context_planes)
    rng = np.random.default_rng(settings.seed)
    sampler = PatchSampler(planes, patch, config.validation_fraction, config.validation_patches_max, rng)
    # Channels as samples train one channel of a plane per sample: each iteration costs what
    # one single-channel crop does. The closing fits see whole planes, every channel at once.
    training = PatchSampler(channels_as_samples(planes, layout.channels), patch, config.validation_fraction,
                            config.validation_patches_max, rng) if network.config.channels_as_samples else sampler
    horizon = pass_horizon(training.training_pixels, config, patch, world()[1])
    trainer = Trainer(network, training, config, device, analysis.pd, settings.seed, cancel, stop_training,
                      horizon=horizon)
    try:
        summary = yield from trainer.run(iterations, time_budget)
    except OutOfMemory as error:
        raise out_of_memory_error(device, "fitting") from error
    stopped = FitCancelled("the fit was stopped; the previous model is unchanged" if previous is not None else
                           "the fit was stopped before it reached any weights")
    if summary.iterations == 0 and not cancel.is_set():
        raise ValueError("the fit ended before its first iteration; give it more time or iterations")
    if summary.iterations == 0 or (previous is not None and cancel.is_set()):
        raise stopped
    summary.channels = analysis.channels.describe() if layout.channels > 1 else None
    summary.camera = analysis.camera.describe() if analysis.camera is not None else None

    model = FittedModel(
        network=network, normalizer=analysis.normalizer, pd=analysis.pd, preset=settings.preset, axes=layout.axes,
        noise_model=analysis.noise_model, noise_measurement=analysis.measurement,
        noise_correlation=analysis.correlation, summary=summary, variance_head_fitted=False, seed=settings.seed,
        fit_config=config, camera=camera_record(settings.camera, analysis.camera),
    )
    if world()[0] > 0:  # under DDP only rank 0 completes (and writes) the model: the others' would be the same
        return model
    try:
        model = _with_variance_head(model, sampler, rng, device, cancel)
        # Line offsets are estimated on p's own lattice, which the lattice filter reads (camera.py).
        if settings.lattice and model.pd == 1 and not (analysis.camera is not None and analysis.camera.blocks_lattice):
            model = _with_lattice_filter(model, sampler, rng, device, cancel)
    except FitCancelled:
        if previous is not None:
            raise stopped from None
        # A first fit keeps the best weights it reached (and the closing fits that finished).
    return model


def _with_variance_head(model: FittedModel, sampler: PatchSampler, rng: np.random.Generator, device: torch.device,
                        cancel: threading.Event) -> FittedModel:
    """The model with its posterior's prior-variance head fitted (where it has one)."""
    if not model.config.variance_head:
        return model
    raise_if_cancelled(cancel, FitCancelled, "the fit")
    network, summary = copy.deepcopy(model.network), copy.deepcopy(model.summary)  # a stop halfway changes neither
    patches = torch.from_numpy(sampler.sample(rng, HEAD_PATCHES))
    summary.variance_head_loss = fit_variance_head(network, patches, model.noise_terms(device), cancel=cancel)
    return dataclasses.replace(model, network=network.eval(), summary=summary, variance_head_fitted=True)


def _with_lattice_filter(model: FittedModel, sampler: PatchSampler, rng: np.random.Generator, device: torch.device,
                         cancel: threading.Event) -> FittedModel:
    """The model with a lattice filter fitted to its mean (pixel-independent noise)."""
    raise_if_cancelled(cancel, FitCancelled, "the fit")
    patches = torch.from_numpy(sampler.sample(rng, LATTICE_PATCHES))
    lattice = fit_lattice_filter(model.network, patches, model.noise_terms(device), cancel=cancel)
    return dataclasses.replace(model, lattice_filter=lattice)
