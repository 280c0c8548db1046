"""`tbsn`: fit and denoise image files from the command line.

    tbsn denoise IN -o OUT [--time-budget S | --iterations N] [--save-model M]
    tbsn fit IN -o MODEL
    tbsn predict IN --model MODEL -o OUT
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import __version__
from .axes import guess_axes, parse_axes
from .config import FIT_PRESETS, NETWORK_PRESETS, PRESET_HINTS
from .denoiser import Denoiser, PredictProgress
from .image_io import ImageFile, open_output, read_image
from .model_io import ModelFileError, write_text_atomic
from .noise import NoiseModel
from .training import FitProgress


class ProgressBar:
    """A one-line text progress bar on stderr (redrawn at most ten times a second)."""

    def __init__(self, label: str, enabled: bool = True, width: int = 28) -> None:
        self.label = label
        self.enabled = enabled
        self.width = width
        self._last = 0.0

    def update(self, fraction: float, detail: str, eta: float | None, force: bool = False) -> None:
        now = time.monotonic()
        # Redraw in place on a terminal; in a log file, one line every 10 seconds.
        terminal = sys.stderr.isatty()
        if not self.enabled or (not force and now - self._last < (0.1 if terminal else 10.0)):
            return
        self._last = now
        filled = int(round(self.width * min(max(fraction, 0.0), 1.0)))
        bar = "#" * filled + "." * (self.width - filled)
        eta_text = "" if eta is None else f" ETA {format_seconds(eta)}"
        line = f"{self.label} |{bar}| {100 * fraction:5.1f}% {detail}{eta_text}"
        sys.stderr.write(f"\r{line}   " if terminal else f"{line}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def _input_axes(image: ImageFile, given: str | None) -> str:
    if given:
        return parse_axes(given, len(image.data.shape))
    if image.axes and len(image.axes) == len(image.data.shape):
        return image.axes
    return guess_axes(tuple(image.data.shape))


@contextlib.contextmanager
def _interrupt_stops_fit(denoiser: Denoiser) -> Iterator[None]:
    """The first Ctrl-C ends the fit early (keeping the best weights); a second one aborts."""

    def stop(signum, frame):
        sys.stderr.write("\nstopping the fit after this iteration (Ctrl-C again to abort)\n")
        denoiser.cancel()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _camera_noise(args: argparse.Namespace) -> NoiseModel | None:
    if args.gain is None and args.read_noise is None:
        return None
    if args.gain is None or args.read_noise is None:
        raise ValueError("a calibrated noise model needs both --gain and --read-noise (leave both out to "
                         "estimate the noise from the data)")
    return NoiseModel.from_camera(args.gain, args.read_noise, args.baseline)


def _fit(args: argparse.Namespace, image: ImageFile, axes: str) -> Denoiser:
    fit_config = FIT_PRESETS[args.preset]
    changes = {k: v for k, v in (("patch_size", args.patch_size), ("batch_size", args.batch_size)) if v}
    denoiser = Denoiser(preset=args.preset, pd=args.pd, device=args.device, seed=args.seed, context=args.context,
                        estimator=args.estimator or "posterior", lattice=args.lattice,
                        fit_config=dataclasses.replace(fit_config, **changes), noise_model=_camera_noise(args))
    bar = ProgressBar("fit", enabled=not args.quiet)

    def on_progress(progress: FitProgress) -> None:
        validation = "" if progress.best_validation_loss is None else f" best val {progress.best_validation_loss:.5f}"
        detail = f"it {progress.iteration} loss {progress.loss:.5f}{validation}"
        bar.update(progress.fraction, detail, progress.eta)

    _log(args, f"fitting the {args.preset} TBSN on {args.input} {tuple(image.data.shape)} axes {axes} "
         f"on {denoiser.device} (pd {args.pd})")
    with _interrupt_stops_fit(denoiser):
        denoiser.fit(image.data, axes, iterations=args.iterations, time_budget=args.time_budget, callback=on_progress)
    bar.close()
    summary = denoiser.summary
    assert summary is not None
    _log(args, denoiser.describe_noise())
    _log(args, f"fitted: {summary.iterations} iterations in {format_seconds(summary.seconds)}, best validation "
         f"loss {summary.best_validation_loss:.6f} at iteration {summary.best_iteration}"
         + (" (stopped early)" if summary.stopped_early else "")
         + (f"; context: {denoiser.context_planes} neighbouring plane(s) on each side" if denoiser.context_planes else ""))
    return denoiser


def _predict(args: argparse.Namespace, denoiser: Denoiser, image: ImageFile, axes: str) -> None:
    bar = ProgressBar("denoise", enabled=not args.quiet)

    def on_progress(progress: PredictProgress) -> None:
        bar.update(progress.fraction, f"plane {progress.plane + 1}/{progress.planes}", progress.eta)

    shape = tuple(image.data.shape)
    with contextlib.ExitStack() as outputs:
        out = outputs.enter_context(open_output(args.output, shape, axes, like=image))
        uncertainty = None
        if args.uncertainty:
            uncertainty = outputs.enter_context(open_output(args.uncertainty, shape, axes, like=image))
        denoiser.predict(image.data, axes, out=out, callback=on_progress, uncertainty=uncertainty)
    bar.close()
    _log(args, f"wrote {args.output}" + (f" and the posterior standard deviation to {args.uncertainty}"
                                         if args.uncertainty else ""))
    if denoiser.quality is not None:
        _log(args, denoiser.quality.describe())
    if args.report:
        _write_report(args.report, denoiser)


def _write_report(path: Path, denoiser: Denoiser) -> None:
    """What was fitted and how good the result is estimated to be, as JSON (atomically)."""
    quality = denoiser.quality
    report = {
        "pd": denoiser.pd,
        "estimator": "posterior" if denoiser.uses_posterior else "blind_spot",
        "context_planes": denoiser.context_planes,
        "lattice_filter": denoiser.lattice_filter.to_dict() if denoiser.lattice_filter else None,
        "noise_model": denoiser.noise_model.to_dict() if denoiser.noise_model else None,
        "noise_measurement": denoiser.noise_measurement.to_dict() if denoiser.noise_measurement else None,
        "noise_correlation": denoiser.noise_correlation.to_dict() if denoiser.noise_correlation else None,
        "training": dataclasses.asdict(denoiser.summary) if denoiser.summary else None,
        "quality_estimate": None if quality is None else
        {"mse": quality.mse, "rmse": quality.rmse, "psnr": quality.psnr, "data_range": quality.data_range},
    }
    write_text_atomic(path, json.dumps(report, indent=1))


def _log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _apply_prediction_options(args: argparse.Namespace, denoiser: Denoiser) -> None:
    if args.tile_size:
        denoiser.tile_size = args.tile_size
    denoiser.ensemble = args.ensemble
    if args.refine is not None:
        denoiser.refine = args.refine
    if args.estimator:
        denoiser.estimator = args.estimator


def command_fit(args: argparse.Namespace) -> None:
    image = read_image(args.input)
    axes = _input_axes(image, args.axes)
    denoiser = _fit(args, image, axes)
    denoiser.save(args.output)
    _log(args, f"saved the model to {args.output}")


def command_predict(args: argparse.Namespace) -> None:
    denoiser = Denoiser.load(args.model, device=args.device)
    _apply_prediction_options(args, denoiser)
    image = read_image(args.input)
    _predict(args, denoiser, image, _input_axes(image, args.axes))


def command_denoise(args: argparse.Namespace) -> None:
    image = read_image(args.input)
    axes = _input_axes(image, args.axes)
    denoiser = _fit(args, image, axes)
    _apply_prediction_options(args, denoiser)
    if args.save_model:
        denoiser.save(args.save_model)
        _log(args, f"saved the model to {args.save_model}")
    _predict(args, denoiser, image, axes)


def command_sample(args: argparse.Namespace) -> None:
    from .samples import SAMPLE_AXES, clean_stack, noisy_stack

    args.output.mkdir(parents=True, exist_ok=True)
    for name, stack in (("noisy.tif", noisy_stack()), ("clean.tif", clean_stack())):
        with open_output(args.output / name, stack.shape, SAMPLE_AXES) as out:
            out[:] = stack
        _log(args, f"wrote {args.output / name} {stack.shape} ({SAMPLE_AXES}, photons)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbsn",
        description="Self-supervised TBSN denoising of microscopy images (TIFF, .npy, .zarr).",
    )
    parser.add_argument("--version", action="version", version=f"napari-tbsn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("input", type=Path, help="noisy image: .tif/.tiff, .npy or .zarr")
        sub.add_argument("--axes", help="axis letters from STCZYX, e.g. ZYX (default: file metadata or shape)")
        sub.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
        sub.add_argument("--quiet", action="store_true", help="no progress output")

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
        sub.add_argument("--tile-size", type=int, help="prediction tile size in pixels (default 768)")
        sub.add_argument("--ensemble", type=_auto_or_whole, choices=("auto", 1, 8), default="auto",
                         help="8: average over flips and rotations (8x the prediction time); auto: 8 for "
                         "pixel-independent noise (pd 1) on inputs up to half a megapixel, else 1 "
                         "(default auto)")
        sub.add_argument("--refine", type=int, help="R3 rounds for correlated noise (pd > 1; default 8, 0 = off)")
        sub.add_argument("--uncertainty", type=Path,
                         help="also write the posterior standard deviation (same format and units as the output)")
        sub.add_argument("--report", type=Path, help="write the noise model, fit summary and quality estimate (JSON)")

    def estimator(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--estimator", choices=("posterior", "blind_spot"),
                         help="posterior: fold the noisy pixel back in with the fitted noise model (the default "
                         "for pixel-independent noise); blind_spot: the plain blind-spot mean")

    denoise = commands.add_parser("denoise", help="fit on the input itself, then denoise it")
    common(denoise)
    fitting(denoise)
    tiling(denoise)
    estimator(denoise)
    denoise.add_argument("-o", "--output", type=Path, required=True, help="denoised image (.tif, .npy, .zarr)")
    denoise.add_argument("--save-model", type=Path, help="also save the fitted model here (.safetensors)")
    denoise.set_defaults(run=command_denoise)

    fit = commands.add_parser("fit", help="fit a model on the input and save it")
    common(fit)
    fitting(fit)
    estimator(fit)
    fit.add_argument("-o", "--output", type=Path, required=True, help="model file (.safetensors)")
    fit.set_defaults(run=command_fit)

    predict = commands.add_parser("predict", help="denoise with a saved model")
    common(predict)
    tiling(predict)
    estimator(predict)
    predict.add_argument("--model", type=Path, required=True, help="model file written by tbsn fit")
    predict.add_argument("-o", "--output", type=Path, required=True, help="denoised image (.tif, .npy, .zarr)")
    predict.set_defaults(run=command_predict)

    sample = commands.add_parser("sample", help="write the bundled noisy sample stack and its clean reference")
    sample.add_argument("-o", "--output", type=Path, default=Path("."), help="folder (default: here)")
    sample.add_argument("--quiet", action="store_true")
    sample.set_defaults(run=command_sample)
    return parser


def _auto_or_whole(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError, MemoryError, ModelFileError, RuntimeError) as error:
        print(f"tbsn: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
