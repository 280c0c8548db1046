"""The facade: one object that fits, predicts, saves and loads. The widget, the CLI, the
benchmarks and the tests all go through it.

Pipeline: axes -> normalise -> sample patches -> fit -> tiled predict -> denormalise.
Its settings are fixed when it is made; prediction options can change per call; the fitted
model is a frozen FittedModel that only a successful fit replaces.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
import warnings
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .axes import PlaneLayout, check_array, guess_axes
from .channels import check_channel_mode
from .config import FIT_PRESETS, NETWORK_PRESETS, R3_ROUNDS, FitConfig, NetworkConfig, PredictOptions, network_preset
from .devices import check_threads, choose_threads, resolve_device, torch_threads
from .distillation import StudentPlan, distil_model, plan_student
from .distributed import ClusterSummary
from .camera import Calibration, CorrectedStack
from .errors import BadInput
from .fitting import FitImage, FitSettings, camera_correction, context_for, fit_model, noise_correlation
from .model import FittedModel
from .network import TBSN
from .noise import NoiseModel
from .prediction import (
    PredictProgress,
    QualityEstimate,
    as_predicted,
    check_prediction_input,
    check_uncertainty_possible,
    describe_output,
    ensemble_size,
    make_runner,
    predict_planes,
    tile_side,
    uses_posterior,
)
from .progress import FitCancelled, PredictionCancelled, Stops, drive
from .training import FitProgress

__all__ = ["Denoiser", "FitCancelled", "FitProgress", "PredictOptions", "PredictProgress", "PredictionCancelled",
           "QualityEstimate"]

MAX_PD = 8


def _check_fit_settings(preset, pd, context, noise_model, seed, channels) -> None:
    check_channel_mode(channels)
    if preset not in NETWORK_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(NETWORK_PRESETS)}")
    if pd != "auto" and (isinstance(pd, bool) or not isinstance(pd, int) or not 1 <= pd <= MAX_PD):
        raise ValueError(f"pd must be 'auto' or an integer from 1 to {MAX_PD} (1 for pixel-independent noise), "
                         f"got {pd!r}")
    if context != "auto" and (isinstance(context, bool) or not isinstance(context, int) or not 0 <= context <= 3):
        raise ValueError(f"context must be 'auto' or 0 to 3 planes on each side, got {context!r}")
    if noise_model is not None and not isinstance(noise_model, NoiseModel):
        raise TypeError(f"noise_model must be a NoiseModel (see NoiseModel.from_camera) or None, got {noise_model!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be a whole number, got {seed!r}")


def _too_small(layout: PlaneLayout, preset: str, smallest: int) -> str:
    """Why the planes are too small for `preset`, and the fix that applies: a smaller preset
    where one fits, axes that may be wrong where another axis is longer than Y or X."""
    fits = [name for name in ("tiny", "small") if name != preset
            and network_preset(name).size_multiple <= min(layout.height, layout.width)]
    fix = f"choose the {fits[0]} preset, or a larger image" if fits else "use a larger image (or crop less)"
    longer = [(letter, size) for letter, size in zip(layout.axes, layout.shape)
              if letter not in "YXC" and size > min(layout.height, layout.width)]
    hint = ""
    if longer:
        letter, size = max(longer, key=lambda pair: pair[1])
        hint = (f"; are the axes right? {layout.axes} makes the plane {layout.height}x{layout.width} while {letter} "
                f"has {size} pixels")
    return (f"the image is {layout.height}x{layout.width} pixels (Y x X); fitting the {preset} preset needs at least "
            f"{smallest}x{smallest}: {fix}{hint}")


def _with_threads(threads: int | str, steps: Generator) -> Generator:
    """Run `steps` with `threads` intra-op threads, chosen ("auto": from the cores free then)
    when the job starts, in the thread that runs it: the number is per thread in OpenMP."""
    with torch_threads(choose_threads(threads)):
        return (yield from steps)


def _check_budget(iterations, time_budget) -> None:
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral)
                                   or iterations < 1):
        raise ValueError(f"iterations must be a whole number of at least 1, got {iterations!r}")
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, numbers.Real)
                                    or not math.isfinite(time_budget) or time_budget <= 0):
        raise ValueError(f"time_budget must be a finite, positive number of seconds, got {time_budget!r}")


def _with_axes(arrays: Sequence, axes: str | None) -> list[tuple[Any, str | None]]:
    """(array, axes) for each item: an (array, axes) pair as given, an array with `axes`."""
    return [item if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str) else (item, axes)
            for item in arrays]


def fit_images(data, axes: str | None, names: Sequence[str] | None = None) -> list[FitImage]:
    """The images of a fit, checked: one array with `axes`, a sequence of arrays sharing
    `axes`, or a sequence of (array, axes) pairs; all with the same channels."""
    if isinstance(data, (list, tuple)):
        if not data:
            raise BadInput("no images to fit: give at least one array")
        items = _with_axes(data, axes)
    else:
        items = [(data, axes)]
    if names is not None and len(names) != len(items):
        raise BadInput(f"{len(names)} name(s) for {len(items)} image(s): give one name per image, or none")
    images = []
    for index, (array, letters) in enumerate(items):
        image = FitImage(array, None, None if names is None else str(names[index]), index)
        where = image.label if len(items) > 1 else ""
        if letters is None:
            raise BadInput(f"{where or 'the image'} has no axes: give axes= (e.g. 'ZYX'), or (array, axes) pairs")
        try:
            check_array(array)
            layout = PlaneLayout.of(array.shape, letters)
        except ValueError as error:
            raise type(error)(f"{where}: {error}" if where else str(error)) from None
        images.append(dataclasses.replace(image, layout=layout))
    first = images[0].layout
    for image in images[1:]:
        if image.layout.channels != first.channels:
            raise BadInput(f"{image.label} has {image.layout.channels} channel(s) but the first image has "
                           f"{first.channels}: fit images with the same channels together")
    return images


class _InMemory:
    """A job's destination in memory: each result a new float32 array (predict_many)."""

    def __init__(self, options: PredictOptions) -> None:
        self.options = options

    def finished(self, image) -> None:
        return None

    def deliver(self, image, data, axes, like, denoiser, cancel, threads):
        return (yield from denoiser.predict_iter(data, axes, options=self.options, cancel=cancel, threads=threads))


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
        tile_size: int = PredictOptions.tile_size,
        tile_overlap: int = PredictOptions.tile_overlap,
        predict_batch_size: int = PredictOptions.batch_size,
        ensemble: int | str = "auto",
        refine: int = R3_ROUNDS,
        context: int | str = "auto",
        lattice: bool = True,
        noise_model: NoiseModel | None = None,
        channels: str = "auto",
        threads: int | str = "auto",
        camera: str | Calibration = "auto",
    ) -> None:
        """`pd`: "auto" (measure the noise correlation at fit time), 1 for pixel-independent
        noise, 2-8 for spatially correlated noise. `context`: neighbouring planes on each side
        (along Z, else T) that the network sees whole beside the blind plane; "auto" takes 1 for
        Z-stacks and 0 otherwise. `lattice`: fit a small linear filter that corrects the
        network's mean from the noisy pixels its dilated blind spot skips (see lattice.py).
        `noise_model`: a calibrated camera model (NoiseModel.from_camera) to use instead of
        estimating one from the data. `channels` (multichannel images): "joint" fits one network
        that reads all channels together; "independent" runs each channel through one
        single-channel network as a sample of its own, with its own normalisation and noise
        model; "auto" picks by how well the channels' structures correlate, and the fit's summary
        says which and why. `threads`: CPU threads for torch; "auto": the cores no other
        process is busy on, measured when a fit, distillation or prediction starts (each of
        them also takes `threads=` for one call). `camera`: "auto" (the default) finds a camera's fixed
        pattern, hot pixels and row or column offsets in the data and takes them out before the
        fit and every prediction (camera.py; the summary says what was found; data without them
        takes the path it took before), "off" takes the data as it is, and a Calibration
        (Calibration.from_dark) uses dark frames of the camera instead. `estimator`, `ensemble`, `refine` and the tile settings
        are the default PredictOptions, which predict() can override per call."""
        _check_fit_settings(preset, pd, context, noise_model, seed, channels)
        if not (camera in ("auto", "off") or isinstance(camera, Calibration)):
            raise BadInput(f"camera must be 'auto', 'off' or a Calibration (Calibration.from_dark), got {camera!r}")
        fit_config = fit_config or FIT_PRESETS[preset]
        if not isinstance(fit_config, FitConfig):
            raise TypeError(f"fit_config must be a FitConfig, got {type(fit_config).__name__}")
        self._options = PredictOptions(estimator=estimator, ensemble=ensemble, refine=refine, lattice=bool(lattice),
                                       tile_size=tile_size, tile_overlap=tile_overlap, batch_size=predict_batch_size)
        self._settings = FitSettings(preset, pd, context, estimator == "posterior", bool(lattice), noise_model,
                                     fit_config, seed, channels, camera)
        self._device = resolve_device(device)
        # What a cluster's workers resolve for themselves ("auto": each its own GPU where it has one).
        self._worker_device = str(device).strip().lower()
        check_threads(threads)
        self._threads = threads
        self._model: FittedModel | None = None
        self._job: threading.Event | None = None  # the cancel token of the running job
        self._quality: QualityEstimate | None = None

    @classmethod
    def from_model(cls, model: FittedModel, options: PredictOptions | None = None, device: str | torch.device = "auto",
                   fit_config: FitConfig | None = None, noise_model: NoiseModel | None | str = "keep",
                   threads: int | str = "auto", camera: str | Calibration | None = None) -> Denoiser:
        """A Denoiser holding `model`: it predicts with it, and fit() fine-tunes a copy of it
        with `fit_config` (default: the model's own) and `noise_model`: "keep" the model's
        calibration (if it has one), a new NoiseModel, or None to estimate the noise. `camera`:
        as the model was fitted ("off" stays off, else found in the data) unless given."""
        if camera is None:
            camera = "off" if model.camera.get("mode") == "off" else "auto"
            if model.camera.get("mode") == "dark frames":
                warnings.warn("this model was fitted with dark frames of the camera, and none are given now: the "
                              "camera is found in the data instead (give camera=Calibration.from_dark(...), or "
                              "--dark)", stacklevel=2)
        options = options or PredictOptions()
        if noise_model == "keep":
            noise_model = model.noise_model if model.noise_model is not None and model.noise_model.given else None
        denoiser = cls(preset=model.preset, pd=model.pd, device=device, seed=model.seed,
                       estimator=options.estimator, fit_config=fit_config or model.fit_config,
                       tile_size=options.tile_size, tile_overlap=options.tile_overlap,
                       predict_batch_size=options.batch_size, ensemble=options.ensemble, refine=options.refine,
                       context=model.context_planes, lattice=options.lattice,
                       noise_model=noise_model, channels="auto" if model.channel_mode == "single" else model.channel_mode,
                       threads=threads, camera=camera)
        # A fine-tune fits a lattice filter where the model has one (pd 1, not turned off).
        denoiser._settings = dataclasses.replace(denoiser._settings, lattice=model.lattice_filter is not None)
        denoiser._options = options  # all of them (the constructor's arguments name most)
        denoiser._model = model
        return denoiser

    # -- state (read-only: a Denoiser changes only by fitting) ---------------------------
    model = property(lambda self: self._model, doc="The fitted model (FittedModel), or None before a fit.")
    options = property(lambda self: self._options, doc="The default prediction options.")
    device = property(lambda self: self._device)
    quality = property(lambda self: self._quality, doc="The estimated error of the last prediction, or None.")
    preset = property(lambda self: self._settings.preset)
    seed = property(lambda self: self._settings.seed)
    fit_config = property(lambda self: self._settings.fit_config)
    context = property(lambda self: self._settings.context)
    channels = property(lambda self: self._settings.channels, doc="How multichannel data are fitted: auto, joint, "
                        "independent (the fitted model's choice: model.config.channels_as_samples).")
    given_noise_model = property(lambda self: self._settings.noise_model)
    camera = property(lambda self: self._settings.camera, doc="How the camera is handled: 'auto', 'off' or a "
                      "Calibration.")
    estimator = property(lambda self: self._options.estimator)
    ensemble = property(lambda self: self._options.ensemble)
    refine = property(lambda self: self._options.refine)
    lattice = property(lambda self: self._options.lattice)
    tile_size = property(lambda self: self._options.tile_size)
    tile_overlap = property(lambda self: self._options.tile_overlap)
    is_fitted = property(lambda self: self._model is not None)

    def _fitted(self, name: str):
        return None if self._model is None else getattr(self._model, name)

    network = property(lambda self: self._fitted("network"))
    normalizer = property(lambda self: self._fitted("normalizer"))
    axes = property(lambda self: self._fitted("axes"))
    summary = property(lambda self: self._fitted("summary"))
    noise_model = property(lambda self: self._fitted("noise_model"))
    noise_measurement = property(lambda self: self._fitted("noise_measurement"))
    noise_correlation = property(lambda self: self._fitted("noise_correlation"))
    lattice_filter = property(lambda self: self._fitted("lattice_filter"))
    context_planes = property(lambda self: self._fitted("context_planes") or 0)
    predicts_posterior = property(lambda self: bool(self._fitted("predicts_posterior")))

    @property
    def network_config(self) -> NetworkConfig | None:
        return None if self._model is None else self._model.config

    @property
    def pd(self) -> int | str:
        """The fitted pd, or the setting ("auto" or a number) before a fit."""
        return self._settings.pd if self._model is None else self._model.pd

    @property
    def uses_posterior(self) -> bool:
        """Whether predict returns the posterior mean by default (else the plain blind-spot mean)."""
        return self._model is not None and uses_posterior(self._model, self._options)

    def describe_noise(self) -> str:
        """The fitted noise model, the measured correlation and the pd and output used."""
        model = self._model
        if model is None or model.noise_model is None or model.noise_correlation is None:
            return "no noise model (fit first)"
        fit = ""
        if model.noise_model.given and model.noise_measurement is not None:
            ratios = ", ".join(f"{r:.2f}" for r in model.noise_measurement.model_ratio(model.noise_model))
            fit = f"; the noise measured on the data is {ratios}x that"
        unfinished = "" if model.variance_head_fitted or not model.config.variance_head else \
            " (the fit stopped before the posterior was fitted: Fit again to complete it)"
        return (f"noise model (input units): {model.noise_model.describe()}{fit}; {model.noise_correlation.describe()}; "
                f"used pd {model.pd}, {describe_output(model, self._options)} output{unfinished}")

    def cancel(self) -> None:
        """Stop the running fit or predict (within a second). A stopped first fit keeps the best
        weights it reached; a stopped fine-tune keeps the previous model."""
        job = self._job  # read once: the worker may start another job meanwhile
        if job is not None:
            job.set()

    def _new_job(self, cancel: threading.Event | None) -> threading.Event:
        self._job = cancel if cancel is not None else threading.Event()
        return self._job

    def _in_threads(self, threads: int | str | None, steps: Generator) -> Generator:
        """A job's `steps` run with the CPU threads asked for (default: the Denoiser's)."""
        threads = self._threads if threads is None else threads
        check_threads(threads)
        return _with_threads(threads, steps)

    # -- fitting -----------------------------------------------------------------------
    def fit(self, data, axes: str | None = None, iterations: int | None = None, time_budget: float | None = None,
            callback: Callable[[FitProgress], None] | None = None, cancel: threading.Event | None = None,
            stop_training: threading.Event | None = None, names: Sequence[str] | None = None) -> Denoiser:
        """Fit (or fine-tune, after load) the network to the noisy `data` itself.

        `data` is one array, or several fitted together into one model: a sequence of arrays
        with one `axes` string, or of (array, axes) pairs. Their sizes may differ in every axis,
        their channels may not; crops come from each in proportion to its pixels, validation is
        held out across them, one noise model is fitted on them all (with a warning where they
        disagree) and `names` (file or layer names, one per array) go into the model file.

        Setting `stop_training` ends the training early and completes the model with the best
        weights reached. Setting `cancel` (or calling cancel()) stops the whole fit within a
        second: a stopped fine-tune raises FitCancelled and keeps the previous model; a first
        fit keeps the best weights it reached, or raises FitCancelled before it has any."""
        return drive(self.fit_iter(data, axes, iterations, time_budget, cancel, stop_training, names=names), callback)

    def fit_iter(self, data, axes: str | None = None, iterations: int | None = None, time_budget: float | None = None,
                 cancel: threading.Event | None = None, stop_training: threading.Event | None = None,
                 threads: int | str | None = None, names: Sequence[str] | None = None,
                 ) -> Generator[FitProgress, None, Denoiser]:
        """fit() as a generator that yields progress after every iteration (for GUIs). The
        arguments are checked, and the job's cancel token made, when it is called."""
        images = fit_images(data, axes, names)
        _check_budget(iterations, time_budget)
        previous = self._model
        layouts = [image.layout for image in images]
        for image in images:
            layout, which = image.layout, image.label if len(images) > 1 else ""
            self._check_fit_layout(layout, which)
            layout.check_context(context_for(self._settings, layouts, previous),
                                 ("choose a smaller context (0 for none)" if previous is None else "fit a new model")
                                 + f" ({which})" * bool(which))
        token = self._new_job(cancel)
        return self._in_threads(threads, self._fit_steps(images, iterations, time_budget, token, previous,
                                                         stop_training))

    def check_fit_image(self, data, axes: str | None) -> PlaneLayout:
        """The layout of one image a fit would take, checked as fit() checks it alone (its axes,
        its size for the preset, the channels of the model it would fine-tune)."""
        layout = fit_images(data, axes or self._default_axes(data))[0].layout
        self._check_fit_layout(layout)
        return layout

    def _check_fit_layout(self, layout: PlaneLayout, which: str = "") -> None:
        """Refuse an image this Denoiser cannot fit: channels other than the model it would
        fine-tune, or planes too small for the preset. `which` names the image among several."""
        previous = self._model
        if previous is not None and previous.channels != layout.channels:
            raise BadInput(f"this model has {previous.channels} channel(s) but {which or 'the data'} has "
                           f"{layout.channels}; fit a new Denoiser for this data")
        smallest = network_preset(self._settings.preset).size_multiple
        if min(layout.height, layout.width) < smallest:
            raise BadInput(f"{which}: " * bool(which) + _too_small(layout, self.preset, smallest))

    def _fit_steps(self, images, iterations, time_budget, token, previous, stop_training):
        model = yield from fit_model(self._settings, images, iterations, time_budget, self._device, token,
                                     previous, stop_training)
        self._model = model  # only a fit that succeeded replaces the model
        return self

    # -- distillation ------------------------------------------------------------------
    student = property(lambda self: self._fitted("student"), doc="The distilled student, or None.")

    def distil(self, data, axes: str | None = None, iterations: int | None = None, time_budget: float | None = None,
               callback: Callable[[Any], None] | None = None, cancel: threading.Event | None = None,
               stop_training: threading.Event | None = None) -> Denoiser:
        """Distil the fitted teacher into a fast UNet student (TBSN2UNet) on `data`. The teacher
        first predicts a few planes as the predict options say (posterior, lattice, ensemble,
        R3); the student then trains to reproduce them (`time_budget` covers both), and is
        checked against the teacher on held-out pixels (student.summary.check; a few student
        passes after the budget). predict then uses the student, unless its check found it
        worse (student=True uses it anyway) or student=False. The callback gets DistilProgress
        while the teacher predicts and while the student is checked, and FitProgress while it
        trains. Stop and cancel behave as in
        fit(): a cancelled distillation raises FitCancelled and keeps the model as it was."""
        return drive(self.distil_iter(data, axes, iterations, time_budget, cancel, stop_training), callback)

    def distil_iter(self, data, axes: str | None = None, iterations: int | None = None,
                    time_budget: float | None = None, cancel: threading.Event | None = None,
                    stop_training: threading.Event | None = None,
                    threads: int | str | None = None) -> Generator[Any, None, Denoiser]:
        """distil() as a generator (for GUIs); the arguments are checked when it is called."""
        model = self._model
        if model is None:
            raise RuntimeError("fit the teacher first: distillation trains a student to reproduce it")
        check_array(data)
        layout = PlaneLayout.of(data.shape, axes or self._default_axes(data))
        _check_budget(iterations, time_budget)
        options = self._options.replace(student=False)
        check_prediction_input(model, layout, None, None, options)
        token = self._new_job(cancel)
        return self._in_threads(threads, self._distil_steps(model, options, data, layout, iterations, time_budget,
                                                            token, stop_training))

    def _distil_steps(self, model, options, data, layout, iterations, time_budget, token, stop_training):
        camera = camera_correction(self._settings.camera, data, layout, model.pd)
        self._model = yield from distil_model(model, options, data, layout, iterations, time_budget, self._device,
                                              token, stop_training, camera)
        return self

    def plan_student(self, choice: str, data, axes: str, time_budget: float | None = None) -> StudentPlan:
        """Whether Fit & Denoise should distil ("auto": when distillation and student prediction
        take less time than teacher prediction, measured on this device), why, and how it
        shares `time_budget` with the fit. Callable before the fit."""
        check_array(data)
        layout = PlaneLayout.of(data.shape, axes)
        if self._model is not None:
            teacher = self._model.network
        else:
            context = context_for(self._settings, layout)
            # "auto" channels are decided by the fit: time the costlier independent network then.
            teacher = TBSN(network_preset(self.preset, layout.channels, variance_head=self._settings.posterior,
                                          context_channels=2 * context * layout.channels,
                                          channels_as_samples=self._settings.channels != "joint"))
        pd = self._coming_pd(data, layout)
        passes = ensemble_size(pd, self._options, layout.shape) * (1 + self._options.refine if pd > 1 else 1)
        # self.fit_config: the one the coming fit runs with, whose model then predicts.
        return plan_student(choice, teacher, self.preset, layout, passes, time_budget, self._device,
                            self.fit_config.mixed_precision)

    def _coming_pd(self, data, layout: PlaneLayout) -> int:
        """The pd the model that predicts will have: the model's, the setting, or ("auto") the one
        the fit will measure on this data, with the camera taken out as the fit does."""
        if self._model is not None:
            return self._model.pd
        if self.pd != "auto":
            return int(self.pd)
        camera = camera_correction(self._settings.camera, data, layout)
        if camera is not None:
            data = CorrectedStack(data, layout, camera)
        return noise_correlation([(data, layout)]).pd

    def export_bioimageio(self, path: str | Path, *, name: str | None = None, authors: list[str] | None = None,
                          **details: Any) -> Path:
        """Write the distilled student as a BioImage Model Zoo package (bioimageio.spec 0.5 zip),
        with a test tensor cut from the data it was distilled on. A model without a student is
        refused: distil first."""
        from .bioimageio import export_bioimageio

        if self._model is None:
            raise RuntimeError("nothing to export: fit() and distil() the Denoiser first")
        student = self._model.student
        sample = None if student is None else student.sample
        if self._model.camera.get("found"):
            warnings.warn("this model was fitted on data with the camera taken out (" + "; ".join(
                self._model.camera["found"]) + "); a Model Zoo package cannot take it out, so zoo tools will feed the "
                "student the camera's fixed pattern and hot pixels as they are: denoise with napari-tbsn instead, or "
                "export a model fitted with camera='off'", stacklevel=2)
        if student is not None and not student.preferred:
            warnings.warn(f"this student's check found it worse than its teacher ({student.summary.check}); the "
                          "package holds it as it is: distil again, or denoise with napari-tbsn", stacklevel=2)
        return export_bioimageio(self._model, path, sample, name=name, authors=authors, **details)

    def _default_axes(self, data) -> str:
        model = self._model
        return model.axes if model is not None and model.axes is not None and len(model.axes) == len(data.shape) \
            else guess_axes(data.shape)

    # -- prediction --------------------------------------------------------------------
    def prediction_options(self, options: PredictOptions | None = None, **changes: Any) -> PredictOptions:
        """`options` (default: this Denoiser's) with `changes` (None values ignored), checked."""
        unknown = set(changes) - set(PredictOptions.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown prediction option(s) {sorted(unknown)}; "
                            f"choose from {sorted(PredictOptions.__dataclass_fields__)}")
        return (options or self._options).replace(**changes)

    def ensemble_size(self, shape: tuple[int, ...], ensemble: int | str | None = None) -> int:
        """How many flipped and rotated views predict averages for data of this shape (before a
        fit: with the pd setting, "auto" counting as 1)."""
        return ensemble_size(self.pd if self.pd != "auto" else 1, self.prediction_options(ensemble=ensemble),
                             tuple(shape))

    def minimum_size(self) -> int:
        """The smallest H and W that predict accepts."""
        if self._model is None:
            return network_preset(self.preset).size_multiple * (1 if self.pd == "auto" else min(int(self.pd), 2))
        return self._model.minimum_size

    def predict(self, data, axes: str | None = None, out=None, callback: Callable[[PredictProgress], None] | None = None,
                uncertainty=None, ensemble: int | str | None = None, *, options: PredictOptions | None = None,
                cancel: threading.Event | None = None, client=None, **changes: Any):
        """Denoise `data` plane by plane; float32 in the input's units, same shape.

        `data` may be any array with numpy slicing (numpy, memmap, dask, zarr); it is read
        one plane at a time. With `out` (same shape, any array that accepts assignment) the
        result is written there and `out` is returned. With `uncertainty` (an array like
        `out`) the posterior standard deviation is written there too. Afterwards `quality`
        holds the estimated error of the result (None where it cannot be estimated).
        `options` (a PredictOptions) and keyword changes to it (`ensemble`, `estimator`,
        `lattice`, `refine`, `tile_size`, ...) apply to this call only.

        With `client` (a dask.distributed Client) the cluster predicts: `data` and `out` must
        be zarr arrays in folders every worker can read (see napari_tbsn.distributed); each
        task writes its chunks of `out`, and a rerun after a failure skips the finished ones.
        """
        if client is not None:
            if uncertainty is not None:
                raise ValueError("an uncertainty map is not made on a cluster: predict it without client=")
            self.predict_on_cluster(client, data, axes, out, ensemble, options=options, cancel=cancel, **changes)
            return out
        steps = self.predict_iter(data, axes, out, uncertainty, ensemble, options=options, cancel=cancel, **changes)
        return drive(steps, callback)

    def predict_many(self, arrays: Sequence, axes: str | None = None,
                     callback: Callable[[Any], None] | None = None, *, names: Sequence[str] | None = None,
                     options: PredictOptions | None = None, cancel: threading.Event | None = None,
                     **changes: Any) -> list[np.ndarray]:
        """Denoise several arrays with this model (loaded once): a float32 result per array, in
        order. `arrays`: arrays sharing `axes` (default: the model's, or guessed), or (array,
        axes) pairs. The callback gets jobs.JobProgress over the whole set (and an ImageReport
        per array); options as predict(). The first array that fails raises its error."""
        from .jobs import JobImage, run_job

        items = _with_axes(arrays, axes)
        if names is not None and len(names) != len(items):
            raise BadInput(f"{len(names)} name(s) for {len(items)} array(s): give one name per array, or none")
        options = self.prediction_options(options, **changes)
        images = [JobImage(str(names[index]) if names is not None else f"array {index + 1}",
                           lambda item=item: (item[0], item[1] or self._default_axes(item[0]), None))
                  for index, item in enumerate(items)]
        stops = Stops(cancel=cancel or threading.Event())
        summary = drive(run_job(self, images, stops, destination=_InMemory(options), keep_going=False), callback)
        if summary.stopped:
            raise PredictionCancelled("predict_many was stopped; the arrays done so far are lost")
        return [report.result for report in summary.done]

    def predict_iter(self, data, axes: str | None = None, out=None, uncertainty=None,
                     ensemble: int | str | None = None, *, options: PredictOptions | None = None,
                     cancel: threading.Event | None = None, threads: int | str | None = None,
                     **changes: Any) -> Generator[PredictProgress, None, Any]:
        """predict() as a generator that yields progress after every batch of tiles. The
        arguments are checked, and the job's cancel token made, when it is called."""
        model, options, layout = self._checked_prediction(data, axes, out, uncertainty, options, ensemble, changes)
        token = self._new_job(cancel)
        return self._in_threads(threads, self._predict_steps(model, options, data, layout, out, uncertainty, token))

    def _checked_prediction(self, data, axes, out, uncertainty, options, ensemble, changes):
        """(model, options, layout) for a prediction, every argument checked before any work."""
        model = self._model
        if model is None:
            raise RuntimeError("this Denoiser has not been fitted yet: call fit() or Denoiser.load() first")
        options = self.prediction_options(options, ensemble=ensemble, **changes)
        check_array(data)
        layout = PlaneLayout.of(data.shape, axes or self._default_axes(data))
        check_prediction_input(model, layout, out, uncertainty, options)
        return as_predicted(model, self._settings.camera, layout), options, layout

    def predict_on_cluster(self, client, data, axes: str | None, out, ensemble: int | str | None = None, *,
                           options: PredictOptions | None = None, cancel: threading.Event | None = None,
                           record: str | Path | None = None, on_submit: Callable[[list], None] | None = None,
                           **changes: Any) -> ClusterSummary:
        """predict(..., client=client), returning what the cluster did (blocks, and those an
        earlier run had finished). `record`: the folder that keeps the finished blocks (default:
        inside the output's store); `on_submit` gets the tasks' futures (e.g. for a progress bar)."""
        from .distributed import predict_on_cluster, smallest_worker_memory

        if out is None:
            raise ValueError("with a client, give out=: a zarr array of the input's shape that every worker can write")
        model, options, layout = self._checked_prediction(data, axes, out, None, options, ensemble, changes)
        views = ensemble_size(model.pd, options, layout.shape)
        # The teacher's tiles decide its output, so every task tiles alike: sized from the worker
        # device with the least free memory, not from this process's.
        runner = make_runner(model, options, self._device, views)
        if options.tile_size == "auto":
            device, free = smallest_worker_memory(client, self._worker_device)
            tile_size = tile_side(runner, options, torch.device(device), free=free)
        else:
            tile_size = tile_side(runner, options, self._device)
        self._quality = None
        camera = camera_correction(self._settings.camera, data, layout, model.pd)  # found once, here, for every task
        return predict_on_cluster(client, model, self._options, options, data, layout, out, tile_size=tile_size,
                                  views=views, device=self._worker_device, record=None if record is None else
                                  Path(record), cancel=cancel, on_submit=on_submit, camera=camera)

    def _predict_steps(self, model, options, data, layout, out, uncertainty, token):
        self._quality = None
        if out is None:
            out = np.empty(layout.shape, dtype=np.float32)
        camera = camera_correction(self._settings.camera, data, layout, model.pd)
        self._quality = yield from predict_planes(model, options, self._device, data, layout, out, uncertainty, token,
                                                  camera)
        return out

    def check_uncertainty(self, data, axes: str | None = None) -> None:
        """Raise BadInput, before any fit, where this Denoiser's camera setting would measure a
        fixed pattern on `data`: the posterior, which an uncertainty map needs, is then ruled out."""
        layout = PlaneLayout.of(data.shape, axes or self._default_axes(data))
        check_uncertainty_possible(camera_correction(self._settings.camera, data, layout))

    # -- model files -------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Everything saved beside the weights."""
        if self._model is None:
            raise RuntimeError("nothing to save: fit() the Denoiser first")
        return self._model.describe(self._options)

    def save(self, path: str | Path) -> Path:
        """Write weights (safetensors) and description (JSON header) atomically to `path`."""
        if self._model is None:
            raise RuntimeError("nothing to save: fit() the Denoiser first")
        return self._model.save(path, self._options)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto", threads: int | str = "auto",
             camera: str | Calibration | None = None) -> Denoiser:
        """The model saved in `path`; `camera` as Denoiser.from_model."""
        model, defaults = FittedModel.load(path)
        return cls.from_model(model, defaults, device=device, threads=threads, camera=camera)
