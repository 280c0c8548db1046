"""Real cameras: the developers' sCMOS cases (cases.Camera) against their clean Poisson-Gaussian
twins and Noise2Void, at one fitting budget, one run per row, one after the other.

Rows per case: napari-tbsn with the camera found in the data (camera="auto", the default), with 100
dark frames of the same camera (`--dark`), with the camera left in ("off"), on
the clean Poisson-Gaussian twin, and Noise2Void (CAREamics) when a Python with it is given.
Hot pixels "survive" where the output exceeds the clean value by more than 3 noise sd
(sqrt(signal + read_sigma^2)). Then which camera effects each benchmark case D1-D6 shows (none
should: there the fit is exactly what it was).

    python benchmarks/camera.py --cases C1 C2 --budget 120 --noise2void /work/n2v/bin/python

Taking a gap apart, at fixed iterations (seeded): `--without rows` (or offsets, spread, tail, hot)
leaves effects out of the camera, `--no-lattice` fits no lattice filter, and `--estimators posterior
blind_spot` predicts each fit both ways, e.g.

    python benchmarks/camera.py --cases C2 --iterations 300 --runs dark twin --no-lattice --without rows
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, Camera, make_case, psnr, without_camera  # noqa: E402

DARK_FRAMES = 100


# Camera effects that --without can leave out of a case's camera (for taking its cost apart).
# Without the spread, the ordinary pixels keep their read-noise power (the twin's read_sigma).
EFFECTS = {"offsets": {"offset_sigma": 0.0}, "spread": {"read_spread": 0.0, "read_sigma": Camera().rms_read_sigma},
           "tail": {"noisy_fraction": 0.0},
           "hot": {"hot_fraction": 0.0}, "rows": {"row_sigma": 0.0}}


def run_tbsn(noisy: np.ndarray, axes: str, budget: float | int, preset: str, camera, lattice: bool = True,
             estimators: tuple[str, ...] = ("posterior",)) -> tuple[dict[str, np.ndarray], float, str]:
    """A fit of `budget` seconds (or iterations, where it is an int), then a prediction with each
    of `estimators` (seconds: the fit and the first prediction)."""
    from napari_tbsn import Denoiser

    start = time.perf_counter()
    length = {"iterations": budget} if isinstance(budget, int) else {"time_budget": budget}
    denoiser = Denoiser(preset=preset, camera=camera, lattice=lattice).fit(noisy, axes, **length)
    outputs = {estimators[0]: denoiser.predict(noisy, axes, estimator=estimators[0])}
    seconds = time.perf_counter() - start
    outputs.update({estimator: denoiser.predict(noisy, axes, estimator=estimator) for estimator in estimators[1:]})
    found = denoiser.summary.camera or "nothing found"
    return outputs, seconds, f"{denoiser.summary.iterations} it; {found}"


def run_noise2void(python: str, noisy: np.ndarray, axes: str, budget: float) -> tuple[np.ndarray, float, str]:
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "noisy.npy", Path(folder) / "denoised.npy"
        np.save(source, noisy)
        start = time.perf_counter()
        done = subprocess.run([python, str(Path(__file__).with_name("noise2void.py")), str(source), axes, str(budget),
                               str(target)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"Noise2Void failed: {done.stderr[-2000:]}")
        return np.load(target), time.perf_counter() - start, done.stdout.strip().splitlines()[-1]


def hot_survivors(output: np.ndarray, clean: np.ndarray, case) -> str:
    _, _, hot = case.camera.pattern(*clean.shape[-2:])
    if not hot.any():
        return ""
    hot = np.broadcast_to(hot > 0, clean.shape)
    signal = clean - case.camera.baseline
    survived = (output - clean > 3 * np.sqrt(np.maximum(signal, 0) + case.read_sigma**2)) & hot
    return f"{survived.sum() / hot.sum():.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["C1", "C2"])
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--noise2void", help="a Python with careamics installed")
    parser.add_argument("--skip-off", nargs="*", default=["C2"], help="cases without the camera 'off' row")
    parser.add_argument("--iterations", type=int, help="fixed iterations instead of the budget (seeded: machine-independent)")
    parser.add_argument("--runs", nargs="+", default=["auto", "dark", "off", "twin", "n2v"],
                        help="which rows: auto dark off twin n2v")
    parser.add_argument("--without", nargs="*", default=[], choices=sorted(EFFECTS),
                        help="camera effects left out of the cases (the twin stays as it is)")
    parser.add_argument("--no-lattice", action="store_true", help="fit no lattice filter")
    parser.add_argument("--estimators", nargs="+", default=["posterior"], choices=["posterior", "blind_spot"],
                        help="predict each fit with each of these (one row each)")
    args = parser.parse_args()
    estimators = tuple(args.estimators)
    from napari_tbsn.camera import Calibration

    print("| case | run | PSNR (dB) | hot pixels surviving | seconds | notes |\n| --- | --- | --- | --- | --- | --- |")
    for name in args.cases:
        case = CASES[name]
        if args.without:
            case = replace(case, camera=replace(case.camera, **{key: value for effect in args.without
                                                                 for key, value in EFFECTS[effect].items()}))
        clean, noisy = make_case(case)
        twin_clean, twin = without_camera(case)
        dark = case.camera.record(np.zeros((DARK_FRAMES, *clean.shape[-2:])), np.random.default_rng(7))
        print(f"| {name} | noisy | {psnr(noisy, clean):.2f} | {hot_survivors(noisy, clean, case)} | | "
              f"{'x'.join(map(str, noisy.shape))} {case.axes}, peak {case.peak}"
              f"{', camera without ' + ' '.join(args.without) if args.without else ''}"
              f"{', no lattice filter' if args.no_lattice else ''} |")
        budget = args.iterations if args.iterations else args.budget
        runs = []

        def tbsn(data, camera):  # a napari-tbsn row as every flag asks for it
            return lambda: run_tbsn(data, case.axes, budget, args.preset, camera, not args.no_lattice, estimators)

        if "auto" in args.runs:
            runs.append(("napari-tbsn, camera found in the data (camera='auto', the default)", tbsn(noisy, "auto")))
        if "dark" in args.runs:
            runs.append((f"napari-tbsn, {DARK_FRAMES} dark frames", tbsn(noisy, Calibration.from_dark(dark))))
        if "off" in args.runs and name not in args.skip_off:
            runs.append(("napari-tbsn, camera left in (off)", tbsn(noisy, "off")))
        if "twin" in args.runs:
            runs.append(("napari-tbsn on the Poisson-Gaussian twin", tbsn(twin, "auto")))
        if args.noise2void and "n2v" in args.runs:
            runs.append(("Noise2Void (CAREamics)", lambda: run_noise2void(args.noise2void, noisy, case.axes,
                                                                          args.budget)))
        for label, run in runs:
            outputs, seconds, notes = run()
            outputs = outputs if isinstance(outputs, dict) else {None: outputs}  # Noise2Void: one output
            twin_run = "twin" in label
            reference = twin_clean if twin_run else clean
            for estimator, output in outputs.items():
                survivors = "" if twin_run else hot_survivors(output, clean, case)
                shown = label if estimator in (None, "posterior") and len(outputs) == 1 else f"{label}, {estimator}"
                print(f"| {name} | {shown} | {psnr(output, reference):.2f} | {survivors} | {seconds:.0f} | {notes} |",
                      flush=True)

    from napari_tbsn.axes import PlaneLayout
    from napari_tbsn.camera import find_correction

    print("\n| case | camera effects found |\n| --- | --- |")
    for name in ("D1", "D2", "D3", "D4", "D5", "D6"):
        _, noisy = make_case(CASES[name])
        print(f"| {name} | {find_correction(noisy, PlaneLayout.of(noisy.shape, CASES[name].axes)).describe()} |")


if __name__ == "__main__":
    main()
