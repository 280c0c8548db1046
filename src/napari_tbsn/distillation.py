"""Distillation (TBSN2UNet): a fast UNet student learns to give the fitted teacher's output.

Targets are the teacher's own predictions of whole planes, made exactly as `predict` makes
them (posterior, lattice filter, ensemble, pd and R3), so a target pixel is what the user
would get from the teacher there. Measured (benchmarks/distill.py): computing targets on the
fly on training patches would need the teacher's whole overlap around each patch, 20x or more
the pixels of the patch, while whole planes cost one pass per pixel; so the teacher predicts
a few evenly spaced planes once, and the student trains on random crops of them with held-out
blocks for validation, keeping its best weights, under the same stop and cancel as a fit.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from .camera import CameraCorrection, CorrectedStack
from .axes import PlaneLayout
from .config import FitConfig, PredictOptions, student_option
from .devices import OutOfMemory, out_of_memory_error, tile_for_memory
from .network.unet import UNet, student_preset
from .student import DistilSummary, Student, sample_crop
from .patches import PatchSampler, check_finite, fitting_patch_size
from .prediction import (TEACHER_BYTES_PER_PIXEL_PER_DIM, StudentModel, TileModel, ensemble_size, plane_steps,
                         prediction_precision, smaller_tile, tile_side)
from .progress import CancellableArray, FitCancelled, PredictionCancelled, raise_if_cancelled
from .training import Trainer

# The teacher predicts about this many pixels of targets (whole planes, at least one).
TARGET_PIXELS = 2**20
# How the student is fitted. Patches are large next to its grid (32) so that the zero padding
# at their borders touches little of the loss. (small, measured on the 20-plane 1024x1024 stack
# with one teacher: 700 iterations of 96-pixel patches scored 0.04 dB above the teacher in 65 s
# of training, these 1000 of 128 pixels +0.14 dB in 140 s; to adopt once D1-D3 are rerun.)
DISTIL_CONFIGS: dict[str, FitConfig] = {
    "tiny": FitConfig(patch_size=64, batch_size=4, learning_rate=2e-3, weight_decay=0.0, default_iterations=300,
                      validation_patches_max=8),
    "small": FitConfig(patch_size=128, batch_size=4, learning_rate=1e-3, weight_decay=0.0, default_iterations=1000,
                       validation_patches_max=8),
    "paper": FitConfig(patch_size=128, batch_size=8, learning_rate=5e-4, weight_decay=0.0, default_iterations=20000),
}


@dataclass(frozen=True)
class DistilProgress:
    """Progress of the distillation's first phase, the teacher's target planes."""

    plane: int
    planes: int
    elapsed: float
    eta: float | None
    fraction: float
    phase: str = "teacher targets"


def target_planes(layout: PlaneLayout) -> list[tuple[int, ...]]:
    """Evenly spaced planes, up to TARGET_PIXELS, in an order whose every prefix is spread
    over the stack (a time budget may stop after any of them)."""
    # Centred in equal shares of the stack, never its first and last plane alone: an edge plane's
    # context is mirrored (both neighbours the same plane), unlike any inner plane's. Measured: a
    # student distilled on plane 0 of a 20-plane stack alone scored 2.4 dB below its teacher.
    count = min(max(1, math.ceil(TARGET_PIXELS / (layout.height * layout.width))), layout.plane_count)
    picks = [layout.plane_index(int((share + 0.5) * layout.plane_count / count)) for share in range(count)]
    order: list[int] = []
    for step in range(8 * len(picks)):
        index = int(((step * GOLDEN) % 1.0) * len(picks))
        if index not in order:
            order.append(index)
    order += [index for index in range(len(picks)) if index not in order]
    return [picks[index] for index in order]


GOLDEN = (math.sqrt(5) - 1) / 2


def teacher_targets(model, options: PredictOptions, device: torch.device, data, layout: PlaneLayout,
                    cancel: threading.Event, time_budget: float | None = None,
                    camera: CameraCorrection | None = None
                    ) -> Generator[DistilProgress, None, tuple[np.ndarray, np.ndarray]]:
    """(N, C * (1 + 2k) + C, H, W): the normalised input blocks of evenly spaced planes, each
    followed by the teacher's normalised output for it; and (N, 2C, H, W): the teacher's
    posterior variance and squared-error estimate there (its other outputs, for the check).
    With a time budget, no new plane is started after half of it (one plane at least)."""
    picks = target_planes(layout)
    tiles = TileModel(model, options, device, ensemble_size(model.pd, options, layout.shape), cancel, camera)
    tile = tile_side(tiles, options, device)
    inputs = layout.channels * (1 + 2 * model.context_planes)
    stack = np.empty((len(picks), inputs + model.channels, layout.height, layout.width), dtype=np.float32)
    errors = np.empty((len(picks), 2 * model.channels, layout.height, layout.width), dtype=np.float32)
    start = time.perf_counter()
    done = 0
    for number, plane in enumerate(picks):
        if number and time_budget is not None and time.perf_counter() - start > time_budget / 2:
            break
        block = layout.read_plane_with_context(data, plane, model.context_planes)
        check_finite(block, f"{layout.describe_plane(plane)} of the input")
        stack[number, :inputs] = model.normalizer.normalize(block)
        while True:
            try:
                # The teacher's output as a prediction gives it (hot pixels, read variance).
                teacher_input = tiles.with_maps(stack[number, :inputs], data, layout, plane)
                steps = plane_steps(tiles.predict_iter(teacher_input, tile), cancel, number, len(picks), start)
                output = yield from _as_distil_progress(steps, number, len(picks))
                break
            except OutOfMemory as error:
                tile = smaller_tile(tile, device, error)
        stack[number, inputs:] = output[: model.channels]
        errors[number] = output[model.channels : 3 * model.channels]
        done += 1
    return stack[:done], errors[:done]


def _as_distil_progress(steps, number: int, planes: int, phase: str = "teacher targets"):
    """Relay a plane's prediction progress as DistilProgress; return its result."""
    while True:
        try:
            progress = next(steps)
        except StopIteration as finished:
            return finished.value
        yield DistilProgress(number, planes, progress.elapsed, progress.eta, progress.fraction, phase)


def l1_objective(inputs: int):
    def objective(output: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return torch.mean(torch.abs(output.float() - batch[:, inputs:].float()))
    return objective


def distil_model(model, options: PredictOptions, data, layout: PlaneLayout, iterations: int | None,
                 time_budget: float | None, device: torch.device, cancel: threading.Event,
                 stop_training: threading.Event | None = None, camera: CameraCorrection | None = None):
    """Distil `model`'s teacher into a new student, yielding DistilProgress while the teacher
    predicts its target planes and FitProgress while the student trains; returns the model with
    the student. A time budget covers both phases. Cancelling raises FitCancelled (the model
    the caller holds is unchanged); stop_training ends the training with the best weights."""
    start = time.perf_counter()
    data = CancellableArray(data, cancel)
    if camera is not None:  # the student learns, and later predicts, on the data without the camera
        data = CorrectedStack(data, layout, camera)
    try:
        stack, errors = yield from teacher_targets(model, options, device, data, layout, cancel, time_budget,
                                                   camera)
    except PredictionCancelled:
        raise FitCancelled("the distillation was stopped; the model is unchanged") from None
    sample = sample_crop(layout.read_plane_with_context(data, target_planes(layout)[0], model.context_planes))
    target_seconds = time.perf_counter() - start
    raise_if_cancelled(cancel, FitCancelled, "the distillation")
    inputs = stack.shape[1] - model.channels
    torch.manual_seed(model.seed)
    network = UNet(student_preset(model.preset, inputs, model.channels)).to(device)
    config = DISTIL_CONFIGS[model.preset]
    patch = fitting_patch_size(config.patch_size, layout.height, layout.width, network.size_multiple)
    rng = np.random.default_rng(model.seed)
    sampler = PatchSampler(stack, patch, config.validation_fraction, config.validation_patches_max, rng)
    trainer = Trainer(network, sampler, config, device, 1, model.seed, cancel, stop_training,
                      objective=l1_objective(inputs), inputs=inputs, forward=network.core)
    left = None if time_budget is None else max(time_budget - target_seconds, 0.1 * time_budget)
    try:
        training = yield from trainer.run(iterations, left)
    except OutOfMemory as error:
        raise out_of_memory_error(device, "distilling") from error
    if cancel.is_set() or training.iterations == 0:
        raise FitCancelled("the distillation was stopped; the model is unchanged")
    student = dataclasses.replace(model, student=Student(network.eval()))
    check = yield from check_student(model, student, options, device, stack, errors, sampler, layout, cancel,
                                     camera)
    summary = DistilSummary(
        iterations=training.iterations, seconds=time.perf_counter() - start, target_seconds=target_seconds,
        target_planes=len(stack), best_iteration=training.best_iteration,
        best_validation_loss=training.best_validation_loss, stopped_early=training.stopped_early,
        teacher_options=options.to_dict(), history=training.history, estimated_change_db=check.change_db,
        preferred=check.preferred, check=check.note)
    return dataclasses.replace(model, student=Student(network, summary, sample))


# -- is the student worse than its teacher? ----------------------------------------------------
# Stein's unbiased risk estimate (SURE) on the distillation's held-out blocks, which the student
# never trained on. For a pixel y = x + n with pixel-independent noise of variance v, and any
# estimate f(y) of x, E[(f - x)^2] = E[(f - y)^2] - v + 2 v E[df/dy] (exact for Gaussian noise,
# to first order for Poisson's). The teacher gives this for itself with every output: its mean
# mu is blind to y, so its posterior w y + (1 - w) mu has slope w, and its squared-error estimate
# is exactly SURE, with v and w read back from its outputs. The student's slope is measured:
# float32 passes (cheap: the student is small) with every held-out pixel nudged up or down at
# random by CHECK_STEP noise standard deviations (Monte-Carlo SURE; the random signs average the
# neighbours' slopes away), CHECK_DRAWS draws averaged. Measured on D6: the student's slope
# grows with the nudge (0.031 at 0.1, 0.058 at 1.0 standard deviations), and bfloat16 passes at
# 0.1 added rounding noise that doubled the estimate's spread.
CHECK_STEP = 0.1
# Nudges drawn per pixel, their slopes averaged: each draw's slope carries the neighbours' slopes
# times random signs, and the student's passes are cheap.
CHECK_DRAWS = 4
# The side of the squares whose means give the estimate's standard error (tile_means_of).
CHECK_TILE = 32
# The student is the default where its estimated PSNR is at most this far below the teacher's.
CHECK_TOLERANCE_DB = 0.05


@dataclass(frozen=True)
class StudentCheck:
    """The student against its teacher on held-out pixels: the estimated PSNR change (dB,
    student minus teacher; None where not estimated), whether the student should denoise by
    default (None: not checked), and what the check found, in words."""

    change_db: float | None
    preferred: bool | None
    note: str


def check_student(teacher, student, options: PredictOptions, device: torch.device, stack: np.ndarray,
                  errors: np.ndarray, sampler: PatchSampler, layout: PlaneLayout, cancel: threading.Event,
                  camera: CameraCorrection | None) -> Generator[DistilProgress, None, StudentCheck]:
    """Compare `student` (the model with the new student) with `teacher` on the distillation's
    validation blocks of `stack` (the targets' normalised inputs and teacher outputs; `errors`
    the teacher's other outputs there)."""
    if teacher.pd != 1:
        return StudentCheck(None, None, "not checked against the teacher: the check needs pixel-independent noise "
                                        f"(this model's pd is {teacher.pd})")
    if teacher.noise_model is None:
        return StudentCheck(None, None, "not checked against the teacher: the model has no noise model")
    if sampler.shared_validation:
        return StudentCheck(None, None, "not checked against the teacher: the image is a single block, "
                                        "with none held out")
    pupil = StudentModel(student, device, cancel)
    tile = tile_side(pupil, options, device)
    delivered = pupil.autocast  # the precision predict runs the student in
    picks = target_planes(layout)
    inputs, channels, p = stack.shape[1] - teacher.channels, teacher.channels, sampler.patch_size
    by_plane: dict[int, list[tuple[int, int]]] = {}
    for _, n, r, c in sampler.validation_blocks:
        by_plane.setdefault(n, []).append((r, c))
    rng = np.random.default_rng(teacher.seed)
    differences, teacher_errors, tile_means = [], [], []
    start = time.perf_counter()
    try:
        for number, (n, blocks) in enumerate(sorted(by_plane.items())):
            rows = slice(min(r for r, _ in blocks) * p, (max(r for r, _ in blocks) + 1) * p)
            columns = slice(min(c for _, c in blocks) * p, (max(c for _, c in blocks) + 1) * p)
            held = np.zeros((rows.stop - rows.start, columns.stop - columns.start), dtype=bool)
            for r, c in blocks:
                top, left = r * p - rows.start, c * p - columns.start
                held[top : top + p, left : left + p] = True
            if camera is not None and camera.per_pixel:  # a camera's unusable (hot) pixels: left out
                unusable = camera.pixel_maps(channels, layout.flat_index(picks[n]))[:channels, rows, columns]
                held = held & ~(unusable > 0.5).any(0)
            plane = stack[n, :inputs]
            noisy = plane[:channels, rows, columns]
            teacher_outputs = (stack[n, inputs:, rows, columns], *np.split(errors[n, :, rows, columns], 2))
            variance = noise_variance_used(noisy, teacher_outputs)
            signs = np.where(rng.random((CHECK_DRAWS, *noisy.shape)) < 0.5, -1.0, 1.0).astype(np.float32) * held
            step = CHECK_STEP * np.sqrt(variance)
            sources = [(plane, delivered), (plane, None)]  # as predict runs it, then float32 for the slope
            for draw in signs:
                nudged = plane.copy()
                nudged[:channels, rows, columns] += step * draw
                sources.append((nudged, None))
            outputs = []
            for source, precision in sources:
                pupil.autocast = precision
                steps = plane_steps(pupil.predict_iter(source, tile, (rows, columns)), cancel, number, len(by_plane),
                                    start)
                outputs.append((yield from _as_distil_progress(steps, number, len(by_plane), "checking the student")))
            difference, error = risk_terms(noisy, teacher_outputs, outputs, signs, step)
            differences.append(difference[:, held].ravel())
            teacher_errors.append(error[:, held].ravel())
            tile_means.extend(tile_means_of(np.where(held, difference, np.nan), blocks, rows, columns, p))
    except PredictionCancelled:
        raise FitCancelled("the distillation was stopped; the model is unchanged") from None
    except OutOfMemory:
        return StudentCheck(None, None, "not checked against the teacher: the device ran out of memory")
    differences = np.concatenate(differences)
    if not differences.size:
        return StudentCheck(None, None, "not checked against the teacher: every held-out pixel is a hot pixel")
    means = np.array([mean for mean in tile_means if np.isfinite(mean)])
    spread = float(means.std() / math.sqrt(len(means) - 1)) if len(means) > 1 else None
    return judge(differences, np.concatenate(teacher_errors), spread)


def tile_means_of(difference: np.ndarray, blocks: list[tuple[int, int]], rows: slice, columns: slice,
                  p: int) -> list[float]:
    """The mean of `difference` (C, h, w over the region rows, columns; NaN where left out) over
    each CHECK_TILE-sided square of each block: neighbouring pixels' estimates are correlated
    (the networks share their inputs), squares that far apart about independent, so the spread
    of these means gives the estimate's standard error."""
    side = max(1, min(CHECK_TILE, p))
    means = []
    for r, c in blocks:
        top, left = r * p - rows.start, c * p - columns.start
        for y in range(top, top + p - side + 1, side):
            for x in range(left, left + p - side + 1, side):
                square = difference[:, y : y + side, x : x + side]
                means.append(float(np.nanmean(square)) if np.isfinite(square).any() else float("nan"))
    return means


def noise_variance_used(noisy: np.ndarray, teacher: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """The noise variance v the teacher's outputs (estimate t, posterior variance w v, squared-error
    estimate (t - y)^2 - v + 2 w v) were made with, read back from them (at least 1e-12)."""
    target, posterior_variance, error = teacher
    return np.maximum((target - noisy) ** 2 + 2 * posterior_variance - error, 1e-12)


def risk_terms(noisy: np.ndarray, teacher: tuple[np.ndarray, np.ndarray, np.ndarray],
               student: list[np.ndarray], signs: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, SURE's estimates of the student's squared error minus the teacher's, and of the
    teacher's. `teacher`: its estimate, posterior variance and squared-error estimate; `student`:
    its output as prediction gives it, then in float32, then in float32 with the pixels nudged
    by each draw of `signs` (D, C, H, W) times `step`."""
    variance = noise_variance_used(noisy, teacher)
    output, exact, *nudged = (values[: noisy.shape[0]] for values in student)
    slope = np.mean([draw * (values - exact) for draw, values in zip(signs, nudged)], axis=0) / step
    return (output - noisy) ** 2 - variance + 2 * variance * slope - teacher[2], teacher[2]


def judge(differences: np.ndarray, teacher_errors: np.ndarray, spread: float | None = None) -> StudentCheck:
    """The verdict from per-pixel estimates of the student's squared error minus the teacher's,
    and of the teacher's squared error; `spread`: the standard error of the first's mean (where
    not given, as if the pixels were independent)."""
    pixels = differences.size
    difference = float(differences.mean())
    error = float(teacher_errors.mean())
    if spread is None:
        spread = float(differences.std() / math.sqrt(max(pixels - 1, 1)))
    if error <= 0 or error + difference <= 0:
        # The teacher's estimated error is within the estimate's noise: judge the difference alone.
        preferred = difference <= 2 * spread
        verdict = "no worse than" if preferred else "worse than"
        return StudentCheck(None, preferred, f"the student is {verdict} the teacher on {pixels} held-out pixels "
                                             f"(the teacher's error is too small to estimate in dB)")
    change = -10 * math.log10((error + difference) / error)
    preferred = change >= -CHECK_TOLERANCE_DB
    uncertainty = 10 * math.log10((error + difference + 2 * spread) / (error + difference))
    which = "the student denoises" if preferred else "the teacher denoises (the student is kept: student 'on' uses it)"
    return StudentCheck(change, preferred, f"estimated {change:+.2f} dB (+-{uncertainty:.2f}) against the teacher "
                                           f"on {pixels} held-out pixels: {which}")


# -- choosing between the teacher and a student ---------------------------------------------

@dataclass(frozen=True)
class StudentPlan:
    """Whether to distil before predicting, and why. The fit keeps its whole time budget and
    the distillation runs its default iterations after it: measured on a 20-plane 1024x1024
    stack, a budget shared 70/30 left the student 244 iterations and 3 dB short of its teacher
    (benchmarks/distill.py --stack), where its default iterations match it (D1-D3)."""

    distil: bool
    reason: str
    fit_budget: float | None = None
    distil_budget: float | None = None


def _seconds_per_pixel(network: torch.nn.Module, channels: int, size: int, device: torch.device,
                       autocast: torch.dtype | None) -> float:
    """One timed pass (after a warm-up) on a random input of size x size under `autocast` (the
    precision prediction runs in); a pass the device has no memory for is timed at 256 pixels."""
    try:
        sample = torch.rand(1, channels, size, size, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            network(sample)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            network(sample)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - start) / size**2
    except OutOfMemory:
        if size <= 256:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return _seconds_per_pixel(network, channels, 256, device, autocast)


def timing_side(multiple: int, layout: PlaneLayout, device: torch.device, bytes_per_pixel: float = 0.0) -> int:
    """The side of the passes plan_student times: 256 pixels on a CPU, whose time per pixel holds
    from there on; on a GPU the data's plane up to 1024 pixels (and what its free memory holds at
    `bytes_per_pixel`), since a 256-pixel pass there is bound by kernel launches and overstates
    the small student's cost per pixel most."""
    side = 256
    if device.type != "cpu":
        side = min(1024, max(256, min(layout.height, layout.width)))
        if bytes_per_pixel:
            side = min(side, tile_for_memory(bytes_per_pixel, device, 256))
    return multiple * max(1, side // multiple)


def plan_student(choice: str, teacher: torch.nn.Module, preset: str, layout: PlaneLayout, passes: int,
                 time_budget: float | None, device: torch.device, mixed_precision: bool = True) -> StudentPlan:
    # time_budget: the fit's, passed through to the plan (the distillation adds its own time).
    """`choice` "on", "off" or "auto": auto distils when distillation plus student prediction
    takes less time than teacher prediction (`passes` network passes per pixel: ensemble views,
    R3 rounds), both estimated from passes timed on this device with networks of the shapes this
    data needs (their speed does not depend on their weights), in the precision prediction will
    run in (bfloat16 where the device has it, unless `mixed_precision` is off). The student's
    training is estimated from the same timed pass: an approximation."""
    option = student_option(choice)  # refuses a choice the front ends do not offer
    if option is False:
        return StudentPlan(False, "the teacher predicts (student off)")
    if option is True:
        return StudentPlan(True, "distilling a student (student on)", time_budget)
    planes = target_planes(layout)
    if len(planes) >= layout.plane_count:
        return StudentPlan(False, "the teacher predicts: a student would be distilled on every plane, "
                                  "which costs more than predicting them with the teacher")
    channels = teacher.config.in_channels + teacher.config.context_channels
    size = timing_side(teacher.size_multiple, layout, device, TEACHER_BYTES_PER_PIXEL_PER_DIM * teacher.config.dim)
    timed_teacher = copy.deepcopy(teacher).to(device).eval()
    student = UNet(student_preset(preset, channels, teacher.config.in_channels)).to(device).eval()
    # Timed in the precision prediction will run in: bf16 where the device has it, unless the
    # fit runs (and so the model predicts) in float32.
    autocast = prediction_precision(device, mixed_precision)
    teacher_rate = _seconds_per_pixel(timed_teacher, channels, size, device, autocast) * passes
    student_rate = _seconds_per_pixel(student, channels, size, device, autocast)
    plane_pixels = layout.height * layout.width
    teacher_seconds = layout.plane_count * plane_pixels * teacher_rate
    config = DISTIL_CONFIGS[preset]
    training = config.default_iterations * 3 * config.batch_size * config.patch_size**2 * student_rate
    # The check's student passes: 2 + CHECK_DRAWS over each plane with validation blocks, at most.
    checking = (2 + CHECK_DRAWS) * min(len(planes), config.validation_patches_max) * plane_pixels * student_rate
    distil_seconds = (len(planes) * plane_pixels * teacher_rate + training + checking
                      + layout.plane_count * plane_pixels * student_rate)
    numbers = f"teacher prediction ~{teacher_seconds:.0f} s, distillation and student prediction ~{distil_seconds:.0f} s"
    if distil_seconds < teacher_seconds:
        return StudentPlan(True, f"distilling a student: {numbers}", time_budget)
    return StudentPlan(False, f"the teacher predicts: {numbers}")
