"""`tbsn`: fit and denoise image files from the command line.

    tbsn denoise IN... -o OUT [--time-budget S | --iterations N] [--save-model M]
    tbsn fit IN... -o MODEL
    tbsn predict IN... --model MODEL -o OUT

IN may be several files, folders or patterns: one model is fitted on them all, and -o is then
a folder with one output per input (a rerun skips those already written).
    tbsn distil IN --model MODEL -o MODEL2
    tbsn export MODEL -o NAME.bioimageio.zip
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .axes import guess_axes, parse_axes
from .camera import Calibration
from .channels import CHANNEL_MODES
from .config import (FIT_PRESETS, NETWORK_PRESETS, PRESET_HINTS, STUDENT_CHOICES, PredictOptions,
                     student_option)
from .ddp import in_process_group, start_from_environment, world
from .ddp import stop as stop_processes
from .denoiser import Denoiser
from .errors import MissingDependency, UserError, describe_bug, is_user_error, one_line
from .image_io import ImageFile, open_output, output_bytes, read_image
from .model_io import write_text_atomic
from .outputs import check_not_input, check_output, check_room, check_writable_file, overlaps
from .noise import NoiseModel
from .prediction import describe_output, uses_posterior, uses_student
from .jobs import FitRequest, ImageReport, JobImage, JobProgress, JobSummary, ModelReady, run_job
from .progress import Cancelled, Stops, drive, format_seconds
from .training import FitProgress


class BatchFailed(UserError):
    """Some inputs of a batch failed; the others were written."""


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every partial output is removed on the way out."""


class ProgressBar:
    """tqdm on stderr: redrawn in place on a terminal, a line every 10 seconds in a log file."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=1000, desc=label, disable=not enabled, file=sys.stderr, leave=True,
                         mininterval=0.1 if sys.stderr.isatty() else 10.0,
                         bar_format="{desc} |{bar:28}| {percentage:5.1f}%{postfix}")
        self._done = 0

    def update(self, fraction: float, detail: str, eta: float | None) -> None:
        steps = int(round(1000 * min(max(fraction, 0.0), 1.0)))
        self._bar.set_postfix_str(f"{detail} ETA {format_seconds(eta)}", refresh=False)
        self._bar.update(steps - self._done)
        self._done = steps

    def note(self, message: str) -> None:
        """A line above the bar."""
        if not self._bar.disable:
            self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


def _input_axes(image: ImageFile, given: str | None) -> str:
    if given:
        return parse_axes(given, len(image.data.shape))
    if image.axes and len(image.axes) == len(image.data.shape):
        return image.axes
    return guess_axes(tuple(image.data.shape))


# Under torchrun a Ctrl-C reaches each rank as the signal torchrun forwards (SIGINT, or SIGTERM
# when the launcher itself is terminated, e.g. by a job scheduler); a rank in the terminal's
# process group may get the terminal's SIGINT too, moments apart: signals this soon after the
# first are the same Stop. torchrun kills the ranks 30 s after its signal, which the closing fits
# and the model file must beat.
SAME_STOP_SECONDS = 5.0


@contextlib.contextmanager
def _interrupts(processes: int = 1) -> Iterator[Stops]:
    """The first Ctrl-C in the block is a Stop (Stops.stop); a second one aborts. A Ctrl-C that
    ended a training is spent once that training is over: the next one is a first again (it
    cancels what runs then). Under DDP (`processes` > 1) SIGTERM, which torchrun sends its ranks,
    counts as a Ctrl-C too."""
    stops = Stops()
    numbers = (signal.SIGINT, signal.SIGTERM) if processes > 1 else (signal.SIGINT,)
    first: list[float] = []

    def stop(signum, frame):
        if first and processes > 1 and time.monotonic() - first[0] < SAME_STOP_SECONDS:
            return
        if first and stops.stop_training.is_set() and not stops.training and not stops.cancel.is_set():
            first.clear()  # the training it ended is over: this one stops what runs now
        if first:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            raise KeyboardInterrupt
        first.append(time.monotonic())
        if stops.stop() == "training":
            sys.stderr.write("\nending the training; the fit completes with the best weights (Ctrl-C again stops everything)\n")
        else:
            sys.stderr.write("\nstopping (Ctrl-C again to abort)\n")

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stops
        return
    previous = {number: signal.signal(number, stop) for number in numbers}
    try:
        yield stops
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _camera_noise(args: argparse.Namespace) -> NoiseModel | None:
    if args.gain is None and args.read_noise is None:
        return None
    if args.gain is None or args.read_noise is None:
        raise ValueError("a calibrated noise model needs both --gain and --read-noise (leave both out to "
                         "estimate the noise from the data)")
    return NoiseModel.from_camera(args.gain, args.read_noise, args.baseline)


def _camera(args: argparse.Namespace) -> str | Calibration | None:
    """--camera / --dark: how the camera is handled (None: as the model was fitted)."""
    if args.dark is not None:
        if args.camera == "off":
            raise ValueError("--dark gives the camera's dark frames, --camera off leaves the camera in: give one")
        return Calibration.from_dark(read_image(args.dark).data)
    if args.camera is None and args.command != "predict":  # predict: as the model was fitted
        return "auto"
    return args.camera


IMAGE_SUFFIXES = (".tif", ".tiff", ".npy", ".zarr")
FORMATS = {"tif": ".tif", "npy": ".npy", "zarr": ".zarr", "ome-zarr": ".ome.zarr"}


def _expand_inputs(given: Sequence[Path]) -> tuple[list[Path], bool]:
    """The input files (folders and patterns opened up, each file once), and whether they
    make a batch: several inputs, a folder or a pattern."""
    found, batch = [], len(given) > 1
    for path in given:
        if path.is_dir() and path.suffix.lower() != ".zarr":
            files = sorted(each for each in path.iterdir() if each.suffix.lower() in IMAGE_SUFFIXES
                           and not each.name.startswith("."))
            if not files:
                raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}): give a folder of images")
            found.extend(files)
            batch = True
        elif not path.exists() and glob.has_magic(str(path)):
            files = sorted(Path(each) for each in glob.glob(str(path)) if Path(each).suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"no images match {path}")
            found.extend(files)
            batch = True
        else:
            found.append(path)
    return list(dict.fromkeys(found)), batch


def _output_name(path: Path, image_format: str | None) -> str:
    """The name of an input's result in an output folder: the input's own, or its stem with
    the suffix of `image_format`."""
    if image_format is None:
        return path.name
    stem = path.name[: -len(".ome.zarr")] if path.name.lower().endswith(".ome.zarr") else path.stem
    return stem + FORMATS[image_format]


def _plan_inputs(args: argparse.Namespace) -> None:
    """args.inputs (the files), args.batch, and for commands that write images args.outputs
    (input name -> output path): with a batch, -o is a folder and each output is named after
    its input."""
    args.inputs, args.batch = _expand_inputs(args.input)
    writes_images = args.run in (command_predict, command_denoise)
    if not writes_images:
        return
    if args.batch:
        if args.output.exists() and not args.output.is_dir():
            raise ValueError(f"-o {args.output} is a file; with several inputs -o names a folder for the outputs")
        for flag, value in (("--uncertainty", args.uncertainty), ("--report", args.report),
                            ("--workers", args.workers), ("--scheduler", args.scheduler)):
            if value:
                raise ValueError(f"{flag} takes a single input; run the inputs one at a time for it")
        args.outputs = {}
        names: dict[str, Path] = {}
        for path in args.inputs:
            name = _output_name(path, args.format)
            if name.casefold() in names:  # case-insensitive file systems (macOS, Windows) too
                raise ValueError(f"{names[name.casefold()]} and {path} would both be written to {args.output / name}: "
                                 "give inputs with different names, or denoise them in two runs")
            names[name.casefold()] = path
            args.outputs[str(path)] = args.output / name
    else:
        if args.format is not None:
            raise ValueError("--format names the outputs' format when -o is a folder (several inputs); with one "
                             "input the -o file's suffix says it")
        args.outputs = {str(args.inputs[0]): args.output}


def _inputs(args: argparse.Namespace) -> dict[str, Path]:
    """The paths the command reads, by what they are: no output may touch them."""
    named = {name: getattr(args, name) for name in ("model", "dark") if getattr(args, name, None) is not None}
    inputs = getattr(args, "inputs", None) or ([args.input] if getattr(args, "input", None) else [])
    if len(inputs) <= 1:
        return {"input": inputs[0], **named} if inputs else named
    return {**{f"input {index}": path for index, path in enumerate(inputs, start=1)}, **named}


def _check_paths(args: argparse.Namespace) -> None:
    """No path the tool writes may be an input or another output; each must be writable. All
    checked before any work, so a mistake costs nothing."""
    inputs = _inputs(args)
    batch = getattr(args, "batch", False) and args.run in (command_predict, command_denoise)
    outputs = {name: getattr(args, name) for name in ("output", "save_model", "report", "uncertainty")
               if getattr(args, name, None) is not None}
    for name, path in outputs.items():
        flag = "-o" if name == "output" else f"--{name.replace('_', '-')}"
        check_not_input(path, inputs, role=flag)
        for other, taken in ((o, p) for o, p in outputs.items() if o < name):
            if batch and "output" in (name, other):  # a folder of outputs may hold the model file
                clash = [out for out in args.outputs.values() if overlaps(out, path if other == "output" else taken)]
                if clash:
                    raise ValueError(f"{flag} {path} is also the output for one of the inputs; give it a new name")
                continue
            if overlaps(path, taken):
                raise ValueError(f"{flag} {path} is also the {other.replace('_', ' ')} path; "
                                 "give each output its own new file name")
        if name == "output" and batch:
            for each in args.outputs.values():
                check_output(each, inputs, replace=True)
        elif name in ("output", "uncertainty") and args.run in (command_predict, command_denoise):
            check_output(path, inputs, replace=args.overwrite, how_to_allow=", or add --overwrite to replace it")
        else:
            check_writable_file(path)
    _check_cluster_options(args)


def _check_room(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs the disk has no room for (a batch: the outputs still to
    write, of the inputs that can be opened)."""
    planned = []
    for path in args.inputs:
        output = args.outputs[str(path)]
        if args.batch and not args.overwrite and output.exists():
            continue
        try:
            shape = tuple(read_image(path).data.shape)
        except (OSError, ValueError):
            if not args.batch:
                raise
            continue  # reported as failed when its turn comes
        planned.append((output, output_bytes(shape, args.pyramid)))
        if args.uncertainty:
            planned.append((args.uncertainty, output_bytes(shape)))
    check_room(planned)


def _check_cluster_options(args: argparse.Namespace) -> None:
    if getattr(args, "pyramid", 0) < 0:
        raise ValueError(f"--pyramid takes a number of levels of 0 or more, not {args.pyramid}")
    if getattr(args, "workers", None) is None and getattr(args, "scheduler", None) is None:
        return
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers takes a number of worker processes of 1 or more, not {args.workers}")
    if args.uncertainty:
        raise ValueError("--uncertainty is not made on a cluster: leave out --workers/--scheduler")
    source = (getattr(args, "inputs", None) or [args.input])[0]
    if source.suffix.lower() != ".zarr":
        raise ValueError(f"--workers and --scheduler read .zarr or .ome.zarr inputs, which workers open chunk by "
                         f"chunk; {source.name} is not one: convert it first (e.g. with tifffile and zarr)")
    if args.output.suffix.lower() != ".zarr":
        raise ValueError(f"--workers and --scheduler write .zarr or .ome.zarr outputs, whose chunks workers write "
                         f"side by side; name the output {args.output.stem}.ome.zarr")


def _new_denoiser(args: argparse.Namespace, options: PredictOptions | None = None) -> Denoiser:
    """A Denoiser with the fitting options and (for denoise: the distillation's teacher predicts
    with them too) the prediction options given."""
    changes = {k: v for k, v in (("patch_size", args.patch_size), ("batch_size", args.batch_size)) if v is not None}
    options = options or PredictOptions(estimator=args.estimator or "posterior", lattice=args.lattice)
    return Denoiser(preset=args.preset, pd=args.pd, device=args.device, seed=args.seed, context=args.context,
                    channels=args.channels,
                    estimator=options.estimator, lattice=args.lattice, tile_size=options.tile_size,
                    tile_overlap=options.tile_overlap, predict_batch_size=options.batch_size,
                    ensemble=options.ensemble, refine=options.refine,
                    fit_config=dataclasses.replace(FIT_PRESETS[args.preset], **changes),
                    noise_model=_camera_noise(args), threads=args.threads, camera=_camera(args))


def _distil(args: argparse.Namespace, denoiser: Denoiser, image: ImageFile, axes: str,
            iterations: int | None, time_budget: float | None) -> None:
    _log(args, f"distilling a student from the teacher on {args.input}")
    bar = ProgressBar("distil", enabled=not args.quiet)

    def on_progress(progress) -> None:
        stops.follow(progress)
        if isinstance(progress, FitProgress):
            validation = "" if progress.best_validation_loss is None else \
                f" best val {progress.best_validation_loss:.5f}"
            bar.update(progress.fraction, f"student it {progress.iteration} loss {progress.loss:.5f}{validation}",
                       progress.eta)
        else:
            bar.update(progress.fraction, f"{progress.phase}: plane {progress.plane + 1}/{progress.planes}", progress.eta)

    try:
        with _interrupts() as stops:
            denoiser.distil(image.data, axes, iterations=iterations, time_budget=time_budget, callback=on_progress,
                            cancel=stops.cancel, stop_training=stops.stop_training)
    finally:
        bar.close()
    _log(args, denoiser.student.summary.describe())


class _Files:
    """A job's destination on disk: one output file per input (resumable when writing a folder)."""

    def __init__(self, args: argparse.Namespace, options: PredictOptions) -> None:
        self.args, self.options = args, options

    def finished(self, image: JobImage) -> str | None:
        path = self.args.outputs[image.name]
        if self.args.batch and not self.args.overwrite and path.exists():
            return f"{path} is already there (an earlier run's; --overwrite redoes it)"
        return None

    def deliver(self, image: JobImage, data, axes: str, like, denoiser: Denoiser, cancel, threads):
        args, path, shape = self.args, self.args.outputs[image.name], tuple(data.shape)
        if args.batch:  # each file's room when its turn comes (a single output's was checked before any work)
            check_room([(path, output_bytes(shape, args.pyramid))])
        with contextlib.ExitStack() as outputs:
            out = outputs.enter_context(open_output(path, shape, axes, like=like, pyramid=args.pyramid,
                                                    inputs=_inputs(args), replace=args.overwrite or args.batch))
            uncertainty = None
            if args.uncertainty:
                uncertainty = outputs.enter_context(open_output(args.uncertainty, shape, axes, like=like,
                                                                inputs=_inputs(args), replace=args.overwrite))
            yield from denoiser.predict_iter(data, axes, out=out, uncertainty=uncertainty, options=self.options,
                                             cancel=cancel, threads=threads)
        return path


def _job_images(args: argparse.Namespace) -> list[JobImage]:
    def reader(path: Path):
        def read():
            image = read_image(path)
            return image.data, _input_axes(image, args.axes), image
        return read

    return [JobImage(str(path), reader(path)) for path in args.inputs]


def _run(args: argparse.Namespace, denoiser: Denoiser, fit: FitRequest | None,
         options: PredictOptions | None = None, on_model=None) -> JobSummary:
    """The core job (jobs.run_job) with a progress bar per phase, a line per file and the
    outputs written as files."""
    images = _job_images(args)
    destination = None if options is None else _Files(args, options)
    if options is not None:
        _check_room(args)  # before the fit: a full disk found after it would cost the whole fit
        if args.batch:
            args.output.mkdir(parents=True, exist_ok=True)
    what = f"{len(images)} images" if len(images) > 1 else f"{args.inputs[0]}"
    if destination is not None and all(destination.finished(image) is not None for image in images):
        _log(args, f"every output is already in {args.output}: nothing to fit or denoise (--overwrite redoes them)")
    elif fit is not None:
        _log(args, f"fitting the {denoiser.preset} TBSN on {what} on {denoiser.device} (pd {args.pd})")
    elif options is not None:
        _log(args, f"denoising {what} with the {describe_output(denoiser.model, options)} output")
    bars: dict[str, ProgressBar] = {}
    said_plateau: list[int] = []

    def bar(phase: str) -> ProgressBar:
        if phase not in bars:
            for other in bars.values():
                other.close()
            bars[phase] = ProgressBar(phase, enabled=not args.quiet)
        return bars[phase]

    def show(item) -> None:
        stops.follow(item)
        if isinstance(item, JobProgress):
            step = item.step
            if item.phase == "fit":
                if step.iteration == 1:
                    bar("fit").note("training: Ctrl-C ends it early, and the fit completes with the best weights "
                                    "reached")
                if step.plateau is not None and not said_plateau:
                    now = "" if step.cooling_down else ": Ctrl-C ends the training now, with the best weights"
                    bar("fit").note(f"{step.describe_plateau()}{now}")
                    said_plateau.append(step.plateau)
                best = "" if step.best_validation_loss is None else f" best val {step.best_validation_loss:.5f}"
                bar("fit").update(item.fraction, f"it {step.iteration} loss {step.loss:.5f}{best}", step.eta)
            elif item.phase == "distil":
                detail = f"student it {step.iteration} loss {step.loss:.5f}" if isinstance(step, FitProgress) else \
                    f"{step.phase}: plane {step.plane + 1}/{step.planes}"
                bar("distil").update(item.fraction, detail, step.eta)
            else:
                files = f"file {item.image + 1}/{item.images} " if item.images > 1 else ""
                bar("denoise").update(item.fraction, f"{files}plane {step.plane + 1}/{step.planes}", item.eta)
        elif isinstance(item, ModelReady):
            for other in bars.values():
                other.close()
            bars.clear()
            if fit is not None:
                _log(args, denoiser.describe_noise())
                context = f"; context: {denoiser.context_planes} neighbouring plane(s) on each side" \
                    if denoiser.context_planes else ""
                _log(args, f"fitted: {denoiser.summary.describe()}{context}")
            if denoiser.student is not None and fit is not None and fit.student != "off":
                _log(args, denoiser.student.summary.describe())
            if item.note:
                _log(args, item.note)
            if on_model is not None:
                on_model(item)
        elif isinstance(item, ImageReport) and (args.batch or item.status != "done"):
            line = {"done": f"{item.name}: wrote {item.result}", "skipped": f"{item.name}: skipped: {item.message}",
                    "failed": f"{item.name}: FAILED: {item.message}"}[item.status]
            bar("denoise").note(line) if "denoise" in bars else _log(args, line)

    try:
        with _interrupts(world()[1]) as stops:
            summary = drive(run_job(denoiser, images, stops, fit=fit, destination=destination,
                                    keep_going=args.batch, threads=args.threads), show)
    finally:
        for each in bars.values():
            each.close()
    if summary.stopped:
        raise Cancelled("the rest was not denoised" if summary.done else "nothing was denoised")
    if fit is not None and not denoiser.is_fitted:
        _log(args, "nothing was fitted" + (f", so no model was saved to {args.save_model}"
                                           if getattr(args, "save_model", None) else ""))
    if options is None:
        if summary.failed:  # the model was fitted on the others
            raise BatchFailed(f"{len(summary.failed)} of {len(images)} inputs were left out of the fit: " + "; ".join(
                f"{report.name}: {report.message.removeprefix('left out of the fit: ')}" for report in summary.failed))
        return summary
    if not args.batch:
        _log(args, f"wrote {args.output}" + (f" and the posterior standard deviation to {args.uncertainty}"
                                             if args.uncertainty else ""))
        if denoiser.quality is not None:
            _log(args, denoiser.quality.describe())
        if args.report:
            _write_report(args.report, denoiser, options)
        return summary
    _log(args, f"{args.output}: {summary.describe()}")
    if summary.failed:
        raise BatchFailed(f"{len(summary.failed)} of {len(images)} inputs failed: " + "; ".join(
            f"{report.name}: {report.message}" for report in summary.failed))
    return summary


@contextlib.contextmanager
def _dask_client(args: argparse.Namespace) -> Iterator[Any]:
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise MissingDependency("--workers and --scheduler (a dask cluster)", "distributed") from error
    if args.scheduler:
        with Client(args.scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        yield client


def _predict_on_cluster(args: argparse.Namespace, denoiser: Denoiser, image: ImageFile, axes: str,
                        options: PredictOptions) -> None:
    """Each worker predicts whole blocks of chunks and writes them into the output store; a
    rerun after an interruption finds the finished blocks recorded and skips them."""
    from distributed import progress

    if image.format not in ("zarr", "ome-zarr"):
        raise ValueError(f"--workers and --scheduler read .zarr or .ome.zarr inputs, which workers open chunk by chunk; "
                         f"{args.inputs[0].name} is {image.format}: convert it first (e.g. with tifffile and zarr)")
    shape = tuple(image.data.shape)
    with _dask_client(args) as client:
        _log(args, f"dask dashboard: {client.dashboard_link}")

        def show_progress(futures) -> None:
            if not args.quiet and futures:
                progress(futures)

        submitted = []

        def on_submit(futures) -> None:
            submitted.append(True)
            show_progress(futures)

        try:
            with open_output(args.output, shape, axes, like=image, resumable=True, pyramid=args.pyramid,
                             inputs=_inputs(args), replace=args.overwrite) as out:
                summary = denoiser.predict_on_cluster(client, image.data, axes, out, options=options,
                                                      on_submit=on_submit)
        except BaseException:
            if submitted and not args.quiet:
                again = "run the same command again to resume" if args.command == "predict" else \
                    "tbsn predict with the model saved by --save-model and the same output resumes them (a new fit " \
                    "would start them over)"
                print(f"\nthe finished blocks are kept: {again}", file=sys.stderr)
            raise
    _log(args, f"wrote {args.output}: {summary.describe()}")
    if args.report:
        _write_report(args.report, denoiser, options)


def _write_report(path: Path, denoiser: Denoiser, options: PredictOptions) -> None:
    """What was fitted and how good the result is estimated to be, as JSON (atomically)."""
    quality = denoiser.quality
    described = denoiser.describe()
    report = {
        "pd": denoiser.pd,
        "estimator": "student" if uses_student(denoiser.model, options) else
        "posterior" if uses_posterior(denoiser.model, options) else "blind_spot",
        "student": denoiser.student.describe()["summary"] if denoiser.student is not None else None,
        "context_planes": denoiser.context_planes,
        "channels": None if denoiser.model.channel_mode == "single" else denoiser.model.channel_mode,
        **{key: described[key] for key in ("lattice_filter", "noise_model", "noise_measurement", "noise_correlation",
                                           "training")},
        "quality_estimate": None if quality is None else
        {"mse": quality.mse, "rmse": quality.rmse, "psnr": quality.psnr if math.isfinite(quality.psnr) else None,
         "data_range": quality.data_range},
    }
    write_text_atomic(path, json.dumps(report, indent=1))


def _log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _prediction_options(args: argparse.Namespace, defaults: PredictOptions) -> PredictOptions:
    """The defaults with the options given on the command line, checked before any work."""
    if args.uncertainty and args.student == "on":
        raise ValueError("--uncertainty comes from the teacher, not the distilled student: give --student off "
                         "(or auto)")
    return defaults.replace(tile_size=args.tile_size, ensemble=args.ensemble, refine=args.refine,
                            estimator=args.estimator, student=student_option(args.student, args.uncertainty))


def command_fit(args: argparse.Namespace) -> None:
    # Under torchrun every process fits with DDP; rank 0 reports and writes the model.
    args.device = start_from_environment(args.device)
    rank, processes = world()
    args.quiet = args.quiet or rank > 0
    try:
        if in_process_group():
            _log(args, f"fitting on {processes} process(es) with DistributedDataParallel")
        denoiser = _new_denoiser(args)

        def on_model(ready: ModelReady) -> None:
            if rank == 0:
                denoiser.save(args.output)
                _log(args, f"saved the model to {args.output}")

        _run(args, denoiser, FitRequest(args.iterations, args.time_budget), on_model=on_model)
    finally:
        stop_processes()


def command_predict(args: argparse.Namespace) -> None:
    denoiser = Denoiser.load(args.model, device=args.device, threads=args.threads, camera=_camera(args))
    options = _prediction_options(args, denoiser.options)
    if args.student == "on" and denoiser.student is None:
        raise ValueError(f"{args.model} has no distilled student: run tbsn distil first, or give --student auto")
    if args.workers is not None or args.scheduler:
        image = read_image(args.inputs[0])
        _predict_on_cluster(args, denoiser, image, _input_axes(image, args.axes), options)
        return
    _run(args, denoiser, None, options)


def command_denoise(args: argparse.Namespace) -> None:
    options = _prediction_options(args, PredictOptions(lattice=args.lattice))
    if args.uncertainty and (options.estimator != "posterior" or args.pd not in ("auto", 1)):
        raise ValueError("--uncertainty needs the posterior output, which needs pixel-independent noise: "
                         "leave out --estimator blind_spot and --pd (or give --pd 1)")
    denoiser = _new_denoiser(args, options)
    if args.uncertainty:  # before the fit: a fixed pattern found in the stack rules the posterior out
        image = read_image(args.inputs[0])
        denoiser.check_uncertainty(image.data, _input_axes(image, args.axes))

    def on_model(ready: ModelReady) -> None:
        if args.save_model:
            denoiser.save(args.save_model)
            args.saved_model = args.save_model
            _log(args, f"saved the model to {args.save_model}")

    fit = FitRequest(args.iterations, args.time_budget, "off" if args.uncertainty else args.student)
    if args.workers is not None or args.scheduler:  # fit here, then the cluster predicts
        if _run(args, denoiser, fit, on_model=on_model).cancelled:
            raise Cancelled("stopped after the fit: nothing was denoised")
        image = read_image(args.inputs[0])
        _predict_on_cluster(args, denoiser, image, _input_axes(image, args.axes), options)
        return
    _run(args, denoiser, fit, options, on_model=on_model)


def command_distil(args: argparse.Namespace) -> None:
    denoiser = Denoiser.load(args.model, device=args.device, threads=args.threads)
    image = read_image(args.input)
    _distil(args, denoiser, image, _input_axes(image, args.axes), args.iterations, args.time_budget)
    denoiser.save(args.output)
    _log(args, f"saved the model with its student to {args.output}")


def command_export(args: argparse.Namespace) -> None:
    denoiser = Denoiser.load(args.model, device="cpu")
    path = denoiser.export_bioimageio(args.output, name=args.name, authors=args.author or None)
    _log(args, f"wrote the BioImage Model Zoo package {path}")


def command_sample(args: argparse.Namespace) -> None:
    from .samples import SAMPLE_AXES, clean_stack, noisy_stack

    if args.output.exists() and not args.output.is_dir():
        raise ValueError(f"{args.output} is a file; tbsn sample -o takes a folder to write noisy.tif and clean.tif into")
    args.output.mkdir(parents=True, exist_ok=True)
    for name, stack in (("noisy.tif", noisy_stack()), ("clean.tif", clean_stack())):
        with open_output(args.output / name, stack.shape, SAMPLE_AXES) as out:
            out[:] = stack
        _log(args, f"wrote {args.output / name} {stack.shape} ({SAMPLE_AXES}, photons)")


def build_parser() -> argparse.ArgumentParser:
    student_help = ("denoise: distil a fast student UNet after the fit (auto: when that saves time on this data; "
                    "it adds its own minutes after the fit); predict: use the model's student (auto: when it has one and "
                    "its check on held-out pixels did not find it worse than the teacher)")
    parser = argparse.ArgumentParser(
        prog="tbsn",
        description="Self-supervised TBSN denoising of microscopy images (TIFF, .npy, .zarr).",
    )
    parser.add_argument("--version", action="version", version=f"napari-tbsn {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the whole traceback of any error (also: environment variable TBSN_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, many: bool = True) -> None:
        if many:
            sub.add_argument("input", type=Path, nargs="+",
                             help="noisy images: .tif/.tiff, .npy or .zarr files, folders of them, or patterns "
                             "(raw/*.tif); several fit one model together")
        else:
            sub.add_argument("input", type=Path, help="noisy image: .tif/.tiff, .npy or .zarr")
        sub.add_argument("--axes", help="axis letters from STCZYX, e.g. ZYX (default: file metadata or shape)")
        sub.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
        sub.add_argument("--quiet", action="store_true", help="no progress output")
        sub.add_argument("--threads", type=_auto_or_whole, default="auto",
                         help="CPU threads for torch: auto (the cores no other program is busy on; default) or N")

    def camera(sub: argparse.ArgumentParser, predicting: bool = False) -> None:
        group = sub.add_argument_group("camera", "sCMOS fixed pattern, hot pixels and row or column offsets")
        group.add_argument("--camera", choices=("auto", "off"),
                           help="auto: find the camera's fixed pattern, hot pixels and line offsets in the data and "
                           "take them out before the network sees it; off: take the data as it is (default: "
                           + ("as the model was fitted)" if predicting else "auto)"))
        group.add_argument("--dark", type=Path,
                           help="dark frames of the same camera (shutter closed; .tif, .npy or .zarr, frames x Y x "
                           "X): per-pixel offsets and read noise from them instead of from the data")

    def fitting(sub: argparse.ArgumentParser) -> None:
        hints = "; ".join(PRESET_HINTS[name] for name in ("tiny", "small", "paper"))
        sub.add_argument("--preset", default="small", choices=sorted(NETWORK_PRESETS), help=hints)
        budget = sub.add_mutually_exclusive_group()
        budget.add_argument("--iterations", type=int, help="training iterations")
        budget.add_argument("--time-budget", type=float, help="training seconds (default: the preset's iterations)")
        sub.add_argument("--pd", type=_auto_or_whole, default="auto",
                         help="pixel-shuffle factor: auto (measure the noise correlation), 1 for pixel-independent "
                         "noise, 2-5 for spatially correlated noise (default auto)")
        sub.add_argument("--context", type=_auto_or_whole, default="auto",
                         help="neighbouring Z (else T) planes on each side that the network sees beside the "
                         "plane it denoises: auto (1 for Z-stacks, else 0), 0-3 (default auto)")
        sub.add_argument("--channels", choices=CHANNEL_MODES, default="auto",
                         help="multichannel images: joint (one network reads all channels), independent (each "
                         "channel a sample of one single-channel network: unrelated stains), auto (by how well the "
                         "channels' structures correlate; default)")
        sub.add_argument("--patch-size", type=int, help="training patch size (default: the preset's)")
        sub.add_argument("--batch-size", type=int, help="training batch size (default: the preset's)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--lattice", action=argparse.BooleanOptionalAction, default=True,
                         help="correct the network's mean from the noisy pixels its dilated blind spot skips "
                         "(pixel-independent noise; default on)")
        camera = sub.add_argument_group(
            "calibrated noise model", "give the camera's noise instead of estimating it from the data (both "
            "--gain and --read-noise, in the image's units): variance = gain * (signal - baseline) + read-noise^2")
        camera.add_argument("--gain", type=float, help="image units per detected photon (e.g. ADU per electron)")
        camera.add_argument("--read-noise", type=float, help="read-noise standard deviation in image units")
        camera.add_argument("--baseline", type=float, default=0.0,
                            help="the camera's dark offset: the value of a pixel that detected nothing (default 0)")

    def tiling(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--tile-size", type=_auto_or_whole,
                         help="prediction tile size in pixels (default auto: from the free memory)")
        sub.add_argument("--student", choices=STUDENT_CHOICES, default="auto",
                         help=student_help)
        sub.add_argument("--ensemble", type=_auto_or_whole, choices=("auto", 1, 8), default="auto",
                         help="8: average over flips and rotations (8x the prediction time); auto: 8 for "
                         "pixel-independent noise (pd 1) on inputs up to half a megapixel and for correlated noise "
                         "(pd > 1) without R3, else 1 (default auto)")
        sub.add_argument("--refine", type=int,
                         help="R3 rounds for correlated noise (pd > 1; default: the model's own, 0 for new fits: "
                         "the x8 ensemble instead; models saved before 2026-12-07 say 8: give --refine 0)")
        sub.add_argument("--uncertainty", type=Path,
                         help="also write the posterior standard deviation (same format and units as the output)")
        sub.add_argument("--report", type=Path, help="write the noise model, fit summary and quality estimate (JSON)")
        cluster = sub.add_mutually_exclusive_group()
        cluster.add_argument("--workers", type=int,
                             help="predict on a local dask cluster of N worker processes; input and output .zarr or "
                             ".ome.zarr; an interrupted run resumes where it stopped when run again")
        cluster.add_argument("--scheduler", help="predict on a running dask.distributed cluster at this address (e.g. "
                             "tcp://10.0.0.5:8786); input and output on a file system its workers see")
        sub.add_argument("--overwrite", action="store_true",
                         help="replace an existing .zarr output that napari-tbsn did not write (it never replaces "
                         "an input, and replaces its own earlier results without asking)")
        sub.add_argument("--pyramid", type=int, default=0,
                         help="for an .ome.zarr output: also write N levels, each downsampled 2x in Y and X "
                         "(napari then shows large stacks lazily)")

    def output_format(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--format", choices=sorted(FORMATS),
                         help="with several inputs: the outputs' format (default: each input's own)")

    def estimator(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--estimator", choices=("posterior", "blind_spot"),
                         help="posterior: fold the noisy pixel back in with the fitted noise model (the default "
                         "for pixel-independent noise); blind_spot: the plain blind-spot mean")

    denoise = commands.add_parser("denoise", help="fit on the input itself, then denoise it")
    common(denoise)
    camera(denoise)
    fitting(denoise)
    tiling(denoise)
    estimator(denoise)
    denoise.add_argument("-o", "--output", type=Path, required=True,
                         help="denoised image (.tif, .npy, .zarr); with several inputs a folder, each output named "
                         "after its input (a rerun skips the outputs already there)")
    output_format(denoise)
    denoise.add_argument("--save-model", type=Path, help="also save the fitted model here (.safetensors)")
    denoise.set_defaults(run=command_denoise)

    fit = commands.add_parser("fit", help="fit a model on the input and save it")
    common(fit)
    camera(fit)
    fitting(fit)
    estimator(fit)
    fit.add_argument("-o", "--output", type=Path, required=True, help="model file (.safetensors)")
    fit.set_defaults(run=command_fit)

    predict = commands.add_parser("predict", help="denoise with a saved model")
    common(predict)
    camera(predict, predicting=True)
    tiling(predict)
    estimator(predict)
    predict.add_argument("--model", type=Path, required=True, help="model file written by tbsn fit")
    predict.add_argument("-o", "--output", type=Path, required=True,
                         help="denoised image (.tif, .npy, .zarr); with several inputs a folder, each output named "
                         "after its input (a rerun skips the outputs already there)")
    output_format(predict)
    predict.set_defaults(run=command_predict)

    distil = commands.add_parser("distil", help="distil a saved model's teacher into a fast student UNet")
    common(distil, many=False)
    budget = distil.add_mutually_exclusive_group()
    budget.add_argument("--iterations", type=int, help="student training iterations")
    budget.add_argument("--time-budget", type=float, help="seconds for the whole distillation")
    distil.add_argument("--model", type=Path, required=True, help="model file written by tbsn fit")
    distil.add_argument("-o", "--output", type=Path, required=True, help="model file with the student (.safetensors)")
    distil.set_defaults(run=command_distil)

    export = commands.add_parser("export", help="export a distilled model as a BioImage Model Zoo package")
    export.add_argument("model", type=Path, help="model file with a distilled student")
    export.add_argument("-o", "--output", type=Path, required=True, help="package file (NAME.bioimageio.zip)")
    export.add_argument("--name", help="the model's name in the package")
    export.add_argument("--author", action="append", help="an author's name (repeat for several)")
    export.add_argument("--quiet", action="store_true")
    export.set_defaults(run=command_export)

    sample = commands.add_parser("sample", help="write the bundled noisy sample stack and its clean reference")
    sample.add_argument("-o", "--output", type=Path, default=Path("."), help="folder (default: here)")
    sample.add_argument("--quiet", action="store_true")
    sample.set_defaults(run=command_sample)
    for sub in commands.choices.values():  # also after the command: tbsn denoise ... --debug
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _auto_or_whole(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number, got {text!r}") from None


def _written(args: argparse.Namespace) -> str:
    """What a stopped command leaves: nothing, or a batch's finished outputs."""
    saved = f"; the model was saved to {args.saved_model}" if getattr(args, "saved_model", None) else ""
    if getattr(args, "batch", False) and args.command in ("denoise", "predict"):
        return f"the finished outputs in {args.output} are kept: run the same command again to resume{saved}"
    return f"no image was written{saved}" if saved else "nothing was written"


def _terminate(signum, frame):
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input: one line on stderr and exit 2; a bug: what failed and where,
    exit 1; stopped: exit 130 (Ctrl-C) or 143 (SIGTERM). `--debug` (or TBSN_DEBUG=1) adds the
    whole traceback to any error. Every output is written under a temporary name and renamed
    only when complete, so a stopped or failed command leaves none behind."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("TBSN_DEBUG", "") not in ("", "0")
    # tifffile logs what it finds wrong in a file before raising; the error line says it once.
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        if args.command in ("denoise", "fit", "predict"):
            _plan_inputs(args)
        if args.command != "sample":
            _check_paths(args)
        args.run(args)
    except Cancelled as stopped:
        print(f"tbsn: stopped ({stopped}); {_written(args)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"tbsn: stopped by Ctrl-C; {_written(args)}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"tbsn: stopped by SIGTERM; {_written(args)}", file=sys.stderr)
        return 143
    except Exception as error:
        if debug:
            traceback.print_exc()
        if is_user_error(error):
            print(f"tbsn: error: {one_line(error)}", file=sys.stderr)
            return 2
        if not debug:
            print(f"tbsn: {describe_bug(error)}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
