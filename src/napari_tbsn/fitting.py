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
from .camera import Calibration, CameraCorrection, CorrectedStack, camera_record, decides_on_itself, find_correction
from .channels import ChannelChoice, choose_channels
from .config import FitConfig, network_preset
from .ddp import world
from .devices import OutOfMemory, out_of_memory_error
from .lattice import LATTICE_PATCHES, fit_lattice_filter
from .model import FittedModel
from .network import TBSN
from .noise import NoiseCorrelation, NoiseMeasurement, NoiseModel, correlation_of, sample_image_planes
from .normalization import Normalizer
from .patches import PatchSampler, channels_as_samples, fitting_patch_size, load_training_images
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
class FitImage:
    """One image of a fit: its data, its layout, and a name (a file or layer name) that the
    model file records."""

    data: object
    layout: PlaneLayout
    name: str | None = None
    index: int = 0  # its place among the images fitted together

    @property
    def label(self) -> str:
        """How messages name it."""
        return repr(self.name) if self.name else f"image {self.index + 1}"

    def record(self) -> dict:
        return {"name": self.name, "shape": list(self.layout.shape), "axes": self.layout.axes}


# Images fitted together whose measured noise variance differs from the pooled noise model's by
# more than this factor (at the same signal) draw a warning: different cameras or gains.
NOISE_DISAGREEMENT = 1.5


@dataclass(frozen=True)
class DataAnalysis:
    images: list[FitImage]  # what the fit reads: the inputs, or views of them with the camera taken out
    cameras: list[CameraCorrection | None]  # per image
    normalizer: Normalizer
    measurement: NoiseMeasurement
    noise_model: NoiseModel
    correlation: NoiseCorrelation
    pd: int
    channels: ChannelChoice

    @property
    def data(self):
        """The (corrected) data of a single-image fit."""
        return self.images[0].data

    @property
    def camera(self) -> CameraCorrection | None:
        """The camera correction of a single-image fit (of the first image that has one)."""
        return next((camera for camera in self.cameras if camera is not None), None)

    @property
    def lattice_lines(self) -> set[str]:
        """The directions the images' line offsets came out along."""
        return {line for camera in self.cameras if camera is not None for line in camera.lines}

    @property
    def blocks_lattice(self) -> bool:
        return len(self.lattice_lines) > 1 or any(camera is not None and camera.blocks_lattice
                                                  for camera in self.cameras)

    def describe_camera(self) -> str | None:
        """What the camera correction found, per image where the images differ (None: nothing)."""
        found = [camera.describe() if camera is not None else "no camera pattern found" for camera in self.cameras]
        if all(camera is None for camera in self.cameras):
            return None
        if len(set(found)) == 1:
            return found[0]
        return "; ".join(f"{image.label}: {text}" for image, text in zip(self.images, found))


def analyse(images: list[FitImage], settings: FitSettings, previous: FittedModel | None = None) -> DataAnalysis:
    """Normalisation, noise model and noise correlation of the data (pooled over the images
    fitted together), and the pd and channel handling they call for (a fine-tune keeps the
    previous model's: its network was fitted so). The camera (camera.py) is found first, in
    each image on its own, and everything after reads the data without it."""
    cameras = [camera_correction(settings.camera, image.data, image.layout) for image in images]
    corrected = [image if camera is None else dataclasses.replace(image, data=CorrectedStack(image.data, image.layout,
                                                                                             camera))
                 for image, camera in zip(images, cameras)]
    pairs = [(image.data, image.layout) for image in corrected]
    normalizer = Normalizer.from_images(pairs)
    planes = sample_image_planes(pairs)
    measurement = NoiseMeasurement.of_planes(planes)
    if settings.noise_model is not None:
        noise_model = settings.noise_model.for_channels(images[0].layout.channels)
        _warn_on_mismatch(measurement.model_ratio(noise_model))
    else:
        noise_model = NoiseModel.fit(measurement)
        if len(images) > 1:
            _warn_on_disagreement(corrected, noise_model)
    correlation = noise_correlation(pairs)
    pd = previous.pd if previous is not None else correlation.pd if settings.pd == "auto" else int(settings.pd)
    if pd != 1:  # lattice corrections assume pd 1's blind spot (camera.py)
        cameras = [None if camera is None or not camera.for_pd(pd).active else camera.for_pd(pd)
                   for camera in cameras]
        corrected = [image if camera is None else dataclasses.replace(image, data=CorrectedStack(
            image.data, image.layout, camera)) for image, camera in zip(images, cameras)]
    if pd == 1 and correlation.correlated:
        warnings.warn(f"the {correlation.describe()}; with pd=1 the network learns to copy correlated noise: "
                      "use pd='auto' (or the suggested pd)", stacklevel=2)
    if previous is not None:
        channels = ChannelChoice(previous.channel_mode, reason="as the model was fitted")
    else:
        first = corrected[0]
        channels = choose_channels(settings.channels, first.data, first.layout, normalizer)
    return DataAnalysis(corrected, cameras, normalizer, measurement, noise_model, correlation, pd, channels)


def noise_correlation(pairs) -> NoiseCorrelation:
    """The noise correlation of (data, layout) images (the camera taken out), measured on a few
    of their planes: what pd "auto" is chosen from."""
    return correlation_of(sample_image_planes(pairs, 4))


def _warn_on_disagreement(images: list[FitImage], pooled: NoiseModel) -> None:
    """Warn where the images' own noise measurements sit apart around the model fitted on all of
    them (measured / model variance, per image: 1 where the model describes it)."""
    ratios = [NoiseMeasurement.of(image.data, image.layout).model_ratio(pooled) for image in images]
    flat = [image for image, ratio in zip(images, ratios) if not all(np.isfinite(r) and r > 0 for r in ratio)]
    if flat:  # no noise measured at all: a blank or padded field, which only skews the pooled noise model
        warnings.warn(f"{flat[0].label} shows no noise (a blank or constant field?): leave it out of the fit",
                      stacklevel=3)
    kept = [(image, ratio) for image, ratio in zip(images, ratios) if not any(image is each for each in flat)]
    if len(kept) < 2:
        return
    images, ratios = [image for image, _ in kept], [ratio for _, ratio in kept]
    for channel in range(len(ratios[0])):
        each = [ratio[channel] for ratio in ratios]
        if max(each) / min(each) > NOISE_DISAGREEMENT:
            far = max(range(len(each)), key=lambda i: abs(np.log(each[i])))
            where = f" in channel {channel}" if len(ratios[0]) > 1 else ""
            warnings.warn(f"the images disagree on their noise{where}: {images[far].label}'s noise is "
                          f"{each[far]:.2g}x the variance of the noise model fitted on all of them, and theirs spread "
                          f"{max(each) / min(each):.2g}x (a different camera, gain or exposure?); fit such images "
                          "separately, or give the camera's noise model", stacklevel=3)
            return


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


def context_for(settings: FitSettings, layout: PlaneLayout | list[PlaneLayout],
                previous: FittedModel | None = None) -> int:
    """Neighbouring planes on each side the fitted network will read. (A fixed pattern measured
    on the stack keeps its context: its maps for a plane and for the plane's context share no
    plane (camera.StackPattern); measured on C2, 300 iterations, context 1 gave 24.88 dB and
    context 0 23.92.)"""
    if previous is not None:
        return previous.context_planes
    if settings.context == "auto":
        # Measured at 300 s: +0.9 dB on a nuclei Z-stack, none on a time-lapse whose frames move.
        layouts = layout if isinstance(layout, list) else [layout]
        return 1 if all(each.context_axis == "Z" and each.context_length() >= 2 for each in layouts) else 0
    return int(settings.context)


def starting_network(settings: FitSettings, layout: PlaneLayout | list[PlaneLayout], pd: int,
                     previous: FittedModel | None,
                     independent: bool = False) -> TBSN:
    """A copy of the previous model's network to fine-tune, or a new one. (Denoiser.fit_iter has
    checked that the stack gives the context it reads.)"""
    if previous is not None:
        network = copy.deepcopy(previous.network)
    else:
        torch.manual_seed(settings.seed)
        context = context_for(settings, layout)
        channels = (layout[0] if isinstance(layout, list) else layout).channels
        network = TBSN(network_preset(settings.preset, channels, variance_head=settings.posterior and pd == 1,
                                      context_channels=2 * context * channels,
                                      channels_as_samples=independent))
    if network.config.variance_head and pd != 1:
        raise ValueError(f"this model predicts a posterior, which needs pixel-independent noise (pd 1), but pd is "
                         f"{pd}; fit a new model for spatially correlated noise")
    return network


def fit_model(
    settings: FitSettings, images: list[FitImage], iterations: int | None, time_budget: float | None,
    device: torch.device, cancel: threading.Event, previous: FittedModel | None = None,
    stop_training: threading.Event | None = None,
) -> Generator[FitProgress, None, FittedModel]:
    """Fit (or fine-tune `previous`) on one image or several (FitImage: the same channels and
    axis letters, any sizes), yielding progress after every iteration.

    Returns the new model. `stop_training` ends the training early, and the fit completes with
    the best weights reached. `cancel` stops the whole job within a second: it raises
    FitCancelled where there is nothing worth keeping (before training reached any weights, or
    at any point of a fine-tune: the previous model stays); a first fit cancelled later keeps
    the best weights it reached, with the closing fits that had finished."""
    # Every plane read checks the token.
    images = [dataclasses.replace(image, data=CancellableArray(image.data, cancel)) for image in images]
    layout = images[0].layout
    analysis = analyse(images, settings, previous)
    network = starting_network(settings, [image.layout for image in images], analysis.pd, previous,
                               analysis.channels.independent).to(device)
    config = settings.fit_config
    granularity = network.size_multiple * analysis.pd
    height = min(image.layout.height for image in images)
    width = min(image.layout.width for image in images)
    patch = fitting_patch_size(max(config.patch_size, granularity), height, width, granularity)
    planes = load_training_images([(image.data, image.layout) for image in analysis.images], analysis.normalizer,
                                  config.max_training_pixels, network.config.context_planes)
    rng = np.random.default_rng(settings.seed)
    sampler = PatchSampler(planes, patch, config.validation_fraction, config.validation_patches_max, rng,
                           config.validation_pixels)
    # Channels as samples train one channel of a plane per sample: each iteration costs what
    # one single-channel crop does. The closing fits see whole planes, every channel at once.
    training = PatchSampler([channels_as_samples(group, layout.channels) for group in planes], patch,
                            config.validation_fraction, config.validation_patches_max, rng, config.validation_pixels) \
        if network.config.channels_as_samples else sampler
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
    summary.camera = analysis.describe_camera()
    summary.images = len(images)

    model = FittedModel(
        network=network, normalizer=analysis.normalizer, pd=analysis.pd, preset=settings.preset, axes=layout.axes,
        noise_model=analysis.noise_model, noise_measurement=analysis.measurement,
        noise_correlation=analysis.correlation, summary=summary, variance_head_fitted=False, seed=settings.seed,
        fit_config=config, camera=camera_record(settings.camera, analysis.cameras),
        # A fine-tune knows what its starting model knew too.
        fitted_on=(previous.fitted_on if previous is not None else ()) + tuple(image.record() for image in images),
    )
    if world()[0] > 0:  # under DDP only rank 0 completes (and writes) the model: the others' would be the same
        return model
    try:
        model = _with_variance_head(model, sampler, rng, device, cancel)
        # Line offsets are estimated on p's own lattice, which the lattice filter reads (camera.py):
        # it reads residuals centred along them.
        if settings.lattice and model.pd == 1 and not analysis.blocks_lattice:
            far = any(decides_on_itself(settings.camera, image.layout) for image in analysis.images)
            model = _with_lattice_filter(model, sampler, rng, device, cancel, "".join(analysis.lattice_lines), far)
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
                         cancel: threading.Event, line: str = "", far: bool = False) -> FittedModel:
    """The model with a lattice filter fitted to its mean (pixel-independent noise), reading
    residuals centred along `line` where line offsets came out (patches then keep their rows),
    and none on the far ring where single images decide their own hot pixels (`far`)."""
    raise_if_cancelled(cancel, FitCancelled, "the fit")
    patches = torch.from_numpy(sampler.sample(rng, LATTICE_PATCHES, turns=not line))
    lattice = fit_lattice_filter(model.network, patches, model.noise_terms(device), cancel=cancel, line=line,
                                 far=far)
    return dataclasses.replace(model, lattice_filter=lattice)
