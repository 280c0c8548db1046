"""One job for every front end: fit a model on one image or many (or take a loaded one), maybe
distil a student, then denoise each image and hand each result over.

The CLI (`tbsn denoise/fit/predict`, one input or a folder), the widget (Fit, Fit & Denoise,
Denoise all) and `Denoiser.predict_many` all run `run_job`, so they share one set of rules:

- Reading: with a fit, every image is read first; one that cannot be read is reported as
  failed and left out. Without a fit each image is read when its turn comes.
- Stop: the first Stop while the network trains ends the training; the fit completes with the
  best weights, the optional distillation is skipped, and every image is still denoised. Any
  other Stop (or the second) cancels: a cancelled fit raises as Denoiser.fit does; after the
  fit the job ends where it is, the fitted model is kept, finished results stay and the result
  being written is not written.
- Failures: a failed distillation keeps the fitted teacher and says why; a failed image is
  reported and (with `keep_going`) the others go on; otherwise its error is raised.
- Resume: an image whose result the destination already holds is skipped, and said so.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import BadInput, describe_bug, is_user_error, one_line
from .progress import Cancelled, Stops


@dataclass(frozen=True)
class JobImage:
    """One input of a job: a name (file or layer name) and how to read it."""

    name: str
    # -> (data, axes, like): `like` is what the destination copies metadata from (an ImageFile),
    # or None; a file that cannot be read raises here.
    read: Callable[[], tuple[Any, str, Any]]


@dataclass(frozen=True)
class FitRequest:
    """Fit before denoising: the budget, and whether to distil a student ("auto", "on", "off")."""

    iterations: int | None = None
    time_budget: float | None = None
    student: str = "off"


class Destination(Protocol):
    """Where a job's results go (files, layers, arrays)."""

    def finished(self, image: JobImage) -> str | None:
        """Why the image needs no prediction (an earlier run wrote its result), or None."""

    def deliver(self, image: JobImage, data, axes: str, like, denoiser, cancel: threading.Event,
                threads: int | str | None) -> Generator[Any, None, Any]:
        """Predict `data` with `denoiser` into its destination (a generator of the prediction's
        progress); returns what the job reports for it (a path, an array)."""


@dataclass(frozen=True)
class JobProgress:
    """A step of the job: `step` is the phase's own progress (FitProgress, DistilProgress or
    PredictProgress); while denoising, `fraction` and `eta` cover all images."""

    phase: str  # "fit", "distil" or "denoise"
    step: Any
    image: int = 0  # which image is being denoised, of `images`
    images: int = 1
    name: str = ""
    eta: float | None = None

    @property
    def fraction(self) -> float:
        if self.phase != "denoise":
            return self.step.fraction
        return (self.image + self.step.fraction) / self.images


@dataclass(frozen=True)
class ModelReady:
    """The model the job denoises with (fitted, maybe distilled); `note` says what the job
    chose or what failed on the way (a distillation)."""

    denoiser: Any
    note: str = ""
    failed: bool = False


@dataclass(frozen=True)
class ImageReport:
    """What became of one image: "done", "skipped" or "failed"."""

    name: str
    index: int
    images: int
    status: str
    message: str
    result: Any = None
    error: BaseException | None = None


@dataclass
class JobSummary:
    denoiser: Any
    reports: list[ImageReport] = field(default_factory=list)
    stopped: bool = False  # cancelled before every image was handled
    cancelled: bool = False  # the job's cancel token was set (a stop after the fit, in the closing fits...)

    def _with(self, status: str) -> list[ImageReport]:
        return [report for report in self.reports if report.status == status]

    done = property(lambda self: self._with("done"))
    skipped = property(lambda self: self._with("skipped"))
    failed = property(lambda self: self._with("failed"))

    def describe(self) -> str:
        parts = [f"{len(self.done)} denoised"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (finished before)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed ({', '.join(report.name for report in self.failed)})")
        if self.stopped:
            parts.append("stopped before the rest")
        return ", ".join(parts)


def _failure(error: BaseException) -> str:
    return one_line(error) if is_user_error(error) else describe_bug(error, frames=1)


def run_job(denoiser, images: Sequence[JobImage], stops: Stops, *, fit: FitRequest | None = None,
            destination: Destination | None = None, keep_going: bool = True,
            threads: int | str | None = None) -> Generator[Any, None, JobSummary]:
    """Fit `denoiser` on `images` (with `fit`), then denoise each into `destination` (if any).
    Yields JobProgress, ModelReady and one ImageReport per image; returns the JobSummary.
    The module's docstring gives the rules for Stop, failures and resume."""
    images = list(images)
    if not images:
        raise BadInput("no images: give at least one")
    summary = JobSummary(denoiser)
    summary = yield from _steps(denoiser, images, stops, fit, destination, keep_going, threads, summary)
    summary.cancelled = stops.cancel.is_set()
    return summary


def _steps(denoiser, images: list[JobImage], stops: Stops, fit: FitRequest | None, destination: Destination | None,
           keep_going: bool, threads, summary: JobSummary) -> Generator[Any, None, JobSummary]:
    waiting = [index for index, image in enumerate(images)
               if destination is None or destination.finished(image) is None]
    read = {}
    if fit is not None and waiting:  # (a rerun that finds every result written fits nothing)
        read = yield from _read_for_fit(denoiser, images, summary, keep_going)
    # A fit when an image still waiting for its result can be fitted (not when what is left is
    # only images that fail: said so, and the others were written by an earlier run).
    if any(index in read for index in waiting):
        note = yield from _fit(denoiser, images, read, fit, stops, threads)
        read.clear()  # each image is read again at its turn: nothing held open meanwhile
        if stops.cancel.is_set():
            # The fitted model is kept (a cancelled first fit keeps its best weights).
            summary.stopped = destination is not None
            yield ModelReady(denoiser, "stopped after the fit: the fitted model is kept" +
                             (", nothing was denoised" if destination is not None else ""))
            return summary
        yield ModelReady(denoiser, note, note.startswith("the distillation failed"))
        if stops.cancel.is_set():
            summary.stopped = destination is not None
            return summary
    if destination is None:
        return summary
    started = time.monotonic()
    finished = 0
    for index, image in enumerate(images):
        if any(report.index == index for report in summary.reports):
            continue  # could not be read for the fit: said so already
        if stops.cancel.is_set():
            summary.stopped = True
            break
        reason = destination.finished(image)
        if reason is not None:
            report = ImageReport(image.name, index, len(images), "skipped", reason)
        else:
            try:
                data, axes, like = image.read()
                steps = destination.deliver(image, data, axes, like, denoiser, stops.cancel, threads)
                result = yield from _denoise_steps(steps, index, len(images), image.name, started, finished)
                finished += 1
                report = ImageReport(image.name, index, len(images), "done", "denoised", result)
            except Cancelled:
                summary.stopped = True
                break
            except Exception as error:
                if not keep_going:
                    raise
                report = ImageReport(image.name, index, len(images), "failed", _failure(error), error=error)
        summary.reports.append(report)
        yield report
    return summary


def _read_for_fit(denoiser, images: list[JobImage], summary: JobSummary, keep_going: bool):
    """Every image the fit can use, read and checked (index -> (data, axes, like)); with
    `keep_going`, one that cannot be read or does not fit with the others is reported and left
    out (a generator of those reports)."""
    read: dict[int, tuple[Any, str, Any]] = {}
    layouts = {}
    failed: list[tuple[int, BaseException]] = []
    for index, image in enumerate(images):
        try:
            data, axes, like = image.read()
            layouts[index] = denoiser.check_fit_image(data, axes)
            read[index] = (data, axes, like)
        except Exception as error:
            if not keep_going or not is_user_error(error):
                raise
            failed.append((index, error))
    if read:  # the channels most images have decide; the others are left out (a fit needs one count)
        counts = Counter(layout.channels for layout in layouts.values())
        channels = max(counts, key=lambda count: (counts[count], -min(i for i in read if layouts[i].channels == count)))
        for index in [i for i in read if layouts[i].channels != channels]:
            error = BadInput(f"it has {layouts[index].channels} channel(s) where most of the images have {channels}")
            if not keep_going:
                raise error
            del read[index]
            failed.append((index, error))
    for index, error in sorted(failed, key=lambda pair: pair[0]):
        report = ImageReport(images[index].name, index, len(images), "failed", f"left out of the fit: {_failure(error)}",
                             error=error)
        summary.reports.append(report)
        yield report
    if not read:
        raise BadInput(f"none of the {len(images)} images can be fitted: " + "; ".join(
            f"{report.name}: {report.message}" for report in summary.failed))
    return read


def _denoise_steps(steps: Generator, index: int, images: int, name: str, started: float, finished: int):
    """The prediction's progress as JobProgress over all images (the ETA from the images so far)."""
    def over_all(step) -> JobProgress:
        remaining = images - index - 1
        per_image = (time.monotonic() - started) / finished if finished else \
            (step.elapsed + (step.eta or 0.0)) if step.eta is not None else None
        eta = None if step.eta is None or per_image is None else step.eta + remaining * per_image
        return JobProgress("denoise", step, index, images, name, eta)

    return (yield from _as_phase("denoise", steps, over_all))


def _fit(denoiser, images: list[JobImage], read: dict[int, tuple[Any, str, Any]], fit: FitRequest, stops: Stops,
         threads) -> Generator[Any, None, str]:
    """Fit (and maybe distil); returns what the job should say of the student."""
    order = sorted(read)
    arrays = [read[index][:2] for index in order]
    largest = max(arrays, key=lambda pair: _pixels(pair[0]))
    plan = denoiser.plan_student(fit.student, largest[0], largest[1], fit.time_budget)
    steps = denoiser.fit_iter(arrays if len(arrays) > 1 else arrays[0][0], None if len(arrays) > 1 else arrays[0][1],
                              fit.iterations, plan.fit_budget or fit.time_budget, cancel=stops.cancel,
                              stop_training=stops.stop_training, threads=threads,
                              names=[images[index].name for index in order])
    yield from _as_phase("fit", steps)
    if fit.student == "off" and not plan.distil:
        return ""
    if not plan.distil or stops.cancel.is_set():
        return plan.reason
    if stops.stop_training.is_set():
        return "the training was stopped, so no student was distilled (the teacher denoises)"
    try:
        steps = denoiser.distil_iter(largest[0], largest[1], time_budget=plan.distil_budget, cancel=stops.cancel,
                                     stop_training=stops.stop_training, threads=threads)
        yield from _as_phase("distil", steps)
    except Cancelled:
        return "the distillation was stopped: the fitted teacher is kept"
    except Exception as error:
        return f"the distillation failed, the fitted teacher is kept: {_failure(error)}"
    return plan.reason


def _as_phase(phase: str, steps: Generator, wrap=None) -> Generator[JobProgress, None, Any]:
    """`steps` passed on as JobProgress of `phase` (made by `wrap(step)` where given); returns
    what `steps` returns."""
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        yield wrap(step) if wrap is not None else JobProgress(phase, step)


def _pixels(data) -> int:
    total = 1
    for size in data.shape:
        total *= int(size)
    return total
