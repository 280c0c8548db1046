"""`tbsn`: fit and denoise image files from the command line.

    tbsn denoise IN -o OUT [--time-budget S | --iterations N] [--save-model M]
    tbsn fit IN -o MODEL
    tbsn predict IN --model MODEL -o OUT
    tbsn distil IN --model MODEL -o MODEL2
    tbsn export MODEL -o NAME.bioimageio.zip
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from .config import FIT_PRESETS, NETWORK_PRESETS, PRESET_HINTS, PredictOptions
from .ddp import in_process_group, start_from_environment, world
from .ddp import stop as stop_processes
from .denoiser import Denoiser, PredictProgress
from .errors import MissingDependency, describe_bug, is_user_error, one_line
from .image_io import ImageFile, open_output, output_bytes, read_image
from .model_io import write_text_atomic
from .outputs import check_not_input, check_output, check_room, check_writable_file, overlaps
from .noise import NoiseModel
from .prediction import describe_output, uses_posterior, uses_student
from .progress import Cancelled, Stops, format_seconds
from .training import FitProgress


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
    """The first Ctrl-C in the block is a Stop (Stops.stop); a second one aborts. Under DDP
    (`processes` > 1) SIGTERM, which torchrun sends its ranks, counts as a Ctrl-C too."""
    stops = Stops()
    numbers = (signal.SIGINT, signal.SIGTERM) if processes > 1 else (signal.SIGINT,)
    first: list[float] = []

    def stop(signum, frame):
        if first:
            if processes > 1 and time.monotonic() - first[0] < SAME_STOP_SECONDS:
                return
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            raise KeyboardInterrupt
        first.append(time.monotonic())
        if stops.stop() == "training":
            sys.stderr.write("\nending the training; the fit completes with the best weights (Ctrl-C again to abort)\n")
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


def _inputs(args: argparse.Namespace) -> dict[str, Path]:
    """The paths the command reads, by what they are: no output may touch them."""
    return {name: getattr(args, name) for name in ("input", "model", "dark") if getattr(args, name, None) is not None}


def _check_paths(args: argparse.Namespace) -> None:
    """No path the tool writes may be an input or another output; each must be writable. All
    checked before any work, so a mistake costs nothing."""
    inputs = _inputs(args)
    outputs = {name: getattr(args, name) for name in ("output", "save_model", "report", "uncertainty")
               if getattr(args, name, None) is not None}
    for name, path in outputs.items():
        flag = "-o" if name == "output" else f"--{name.replace('_', '-')}"
        check_not_input(path, inputs, role=flag)
        for other, taken in ((o, p) for o, p in outputs.items() if o < name):
            if overlaps(path, taken):
                raise ValueError(f"{flag} {path} is also the {other.replace('_', ' ')} path; "
                                 "give each output its own new file name")
        if name in ("output", "uncertainty") and args.run in (command_predict, command_denoise):
            check_output(path, inputs, replace=args.overwrite, how_to_allow=", or add --overwrite to replace it")
        else:
            check_writable_file(path)
    _check_cluster_options(args)


def _check_room(args: argparse.Namespace, image: ImageFile) -> None:
    shape = tuple(image.data.shape)
    planned = [(args.output, output_bytes(shape, args.pyramid))]
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
    if args.input.suffix.lower() != ".zarr":
        raise ValueError(f"--workers and --scheduler read .zarr or .ome.zarr inputs, which workers open chunk by "
                         f"chunk; {args.input.name} is not one: convert it first (e.g. with tifffile and zarr)")
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


def _fit(args: argparse.Namespace, denoiser: Denoiser, image: ImageFile, axes: str,
         time_budget: float | None) -> Denoiser:
    _log(args, f"fitting the {args.preset} TBSN on {args.input} {tuple(image.data.shape)} axes {axes} "
         f"on {denoiser.device} (pd {args.pd})")
    bar = ProgressBar("fit", enabled=not args.quiet)
    said_plateau: list[int] = []

    def on_progress(progress: FitProgress) -> None:
        stops.follow(progress)
        if progress.iteration == 1:
            bar.note("training: Ctrl-C ends it early, and the fit completes with the best weights reached")
        validation = "" if progress.best_validation_loss is None else f" best val {progress.best_validation_loss:.5f}"
        if progress.plateau is not None and not said_plateau:
            bar.note(f"{progress.describe_plateau()}: Ctrl-C ends the training now, with the best weights")
            said_plateau.append(progress.plateau)
        bar.update(progress.fraction, f"it {progress.iteration} loss {progress.loss:.5f}{validation}", progress.eta)

    try:
        with _interrupts(world()[1]) as stops:
            denoiser.fit(image.data, axes, iterations=args.iterations, time_budget=time_budget,
                         callback=on_progress, cancel=stops.cancel, stop_training=stops.stop_training)
    finally:
        bar.close()
    _log(args, denoiser.describe_noise())
    context = f"; context: {denoiser.context_planes} neighbouring plane(s) on each side" if denoiser.context_planes else ""
    _log(args, f"fitted: {denoiser.summary.describe()}{context}")
    return denoiser


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
            bar.update(progress.fraction, f"teacher plane {progress.plane + 1}/{progress.planes}", progress.eta)

    try:
        with _interrupts() as stops:
            denoiser.distil(image.data, axes, iterations=iterations, time_budget=time_budget, callback=on_progress,
                            cancel=stops.cancel, stop_training=stops.stop_training)
    finally:
        bar.close()
    _log(args, denoiser.student.summary.describe())


def _predict(args: argparse.Namespace, denoiser: Denoiser, image: ImageFile, axes: str,
             options: PredictOptions) -> None:
    shape = tuple(image.data.shape)
    _log(args, f"denoising {args.input} {shape} with the {describe_output(denoiser.model, options)} output")
    if args.student == "on" and denoiser.student is None:
        raise ValueError(f"{getattr(args, 'model', 'the model')} has no distilled student: run tbsn distil first, or give --student auto")
    bar = ProgressBar("denoise", enabled=not args.quiet)

    def on_progress(progress: PredictProgress) -> None:
        bar.update(progress.fraction, f"plane {progress.plane + 1}/{progress.planes}", progress.eta)

    if args.workers is not None or args.scheduler:
        bar.close()
        _predict_on_cluster(args, denoiser, image, axes, options)
        return
    try:
        with contextlib.ExitStack() as outputs, _interrupts() as stops:
            out = outputs.enter_context(open_output(args.output, shape, axes, like=image, pyramid=args.pyramid,
                                                          inputs=_inputs(args), replace=args.overwrite))
            uncertainty = None
            if args.uncertainty:
                uncertainty = outputs.enter_context(open_output(args.uncertainty, shape, axes, like=image,
                                                                      inputs=_inputs(args), replace=args.overwrite))
            denoiser.predict(image.data, axes, out=out, callback=on_progress, uncertainty=uncertainty,
                             options=options, cancel=stops.cancel)
    finally:
        bar.close()
    _log(args, f"wrote {args.output}" + (f" and the posterior standard deviation to {args.uncertainty}"
                                         if args.uncertainty else ""))
    if denoiser.quality is not None:
        _log(args, denoiser.quality.describe())
    if args.report:
        _write_report(args.report, denoiser, options)


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
                         f"{args.input.name} is {image.format}: convert it first (e.g. with tifffile and zarr)")
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
                print("\nthe finished blocks are kept: run the same command again to resume", file=sys.stderr)
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
        "student": denoiser.student.describe()["summary"] if uses_student(denoiser.model, options) else None,
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
                            estimator=args.estimator, student=args.student != "off" and not args.uncertainty)


def command_fit(args: argparse.Namespace) -> None:
    # Under torchrun every process fits with DDP; rank 0 reports and writes the model.
    args.device = start_from_environment(args.device)
    rank, processes = world()
    args.quiet = args.quiet or rank > 0
    try:
        image = read_image(args.input)
        axes = _input_axes(image, args.axes)
        if in_process_group():
            _log(args, f"fitting on {processes} process(es) with DistributedDataParallel")
        denoiser = _fit(args, _new_denoiser(args), image, axes, args.time_budget)
        if rank == 0:
            denoiser.save(args.output)
            _log(args, f"saved the model to {args.output}")
    finally:
        stop_processes()


def command_predict(args: argparse.Namespace) -> None:
    denoiser = Denoiser.load(args.model, device=args.device, threads=args.threads, camera=_camera(args))
    options = _prediction_options(args, denoiser.options)
    image = read_image(args.input)
    _check_room(args, image)
    _predict(args, denoiser, image, _input_axes(image, args.axes), options)


def command_denoise(args: argparse.Namespace) -> None:
    options = _prediction_options(args, PredictOptions(lattice=args.lattice))
    if args.uncertainty and (options.estimator != "posterior" or args.pd not in ("auto", 1)):
        raise ValueError("--uncertainty needs the posterior output, which needs pixel-independent noise: "
                         "leave out --estimator blind_spot and --pd (or give --pd 1)")
    image = read_image(args.input)
    axes = _input_axes(image, args.axes)
    _check_room(args, image)  # before the fit: a full disk found after it would cost the whole fit
    denoiser = _new_denoiser(args, options)
    if args.uncertainty:  # before the fit: a fixed pattern found in the stack rules the posterior out
        denoiser.check_uncertainty(image.data, axes)
    plan = denoiser.plan_student("off" if args.uncertainty else args.student, image.data, axes, args.time_budget)
    _log(args, plan.reason)
    _fit(args, denoiser, image, axes, plan.fit_budget or args.time_budget)
    if plan.distil:
        _distil(args, denoiser, image, axes, None, plan.distil_budget)
    if args.save_model:
        denoiser.save(args.save_model)
        _log(args, f"saved the model to {args.save_model}")
    _predict(args, denoiser, image, axes, options)


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
                    "it adds its own minutes after the fit); predict: use the model's student (auto: when it has one)")
    parser = argparse.ArgumentParser(
        prog="tbsn",
        description="Self-supervised TBSN denoising of microscopy images (TIFF, .npy, .zarr).",
    )
    parser.add_argument("--version", action="version", version=f"napari-tbsn {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the whole traceback of any error (also: environment variable TBSN_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
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
        sub.add_argument("--student", choices=("auto", "on", "off"), default="auto",
                         help=student_help)
        sub.add_argument("--ensemble", type=_auto_or_whole, choices=("auto", 1, 8), default="auto",
                         help="8: average over flips and rotations (8x the prediction time); auto: 8 for "
                         "pixel-independent noise (pd 1) on inputs up to half a megapixel, else 1 "
                         "(default auto)")
        sub.add_argument("--refine", type=int, help="R3 rounds for correlated noise (pd > 1; default 8, 0 = off)")
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
    denoise.add_argument("-o", "--output", type=Path, required=True, help="denoised image (.tif, .npy, .zarr)")
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
    predict.add_argument("-o", "--output", type=Path, required=True, help="denoised image (.tif, .npy, .zarr)")
    predict.set_defaults(run=command_predict)

    distil = commands.add_parser("distil", help="distil a saved model's teacher into a fast student UNet")
    common(distil)
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
        if args.command != "sample":
            _check_paths(args)
        args.run(args)
    except Cancelled as stopped:
        print(f"tbsn: stopped ({stopped}); nothing was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("tbsn: stopped by Ctrl-C; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("tbsn: stopped by SIGTERM; nothing was written", file=sys.stderr)
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
