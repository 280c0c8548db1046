"""Quality benchmark: the cases of ../shared/BENCHMARK.md, napari-tbsn against BM3D + VST.

napari-tbsn runs through the `tbsn denoise` command line (as a user would), with the given
fitting budget; BM3D + VST runs in the same process right after, when `bm3d` is installed.
Prints a table of PSNR (dB) and wall time.

    python benchmarks/quality.py --cases D1 --budget 300 --preset small
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, NOISE2VOID_300S, make_case, psnr  # noqa: E402


def run_tbsn(noisy: np.ndarray, axes: str, budget: float | int, preset: str, pd: str, device: str,
             ensemble: bool, plain: bool, raw: bool, options: tuple[str, ...] = ()) -> dict:
    """`tbsn denoise` (with the extra command-line `options`, fitting for `budget` seconds, or
    for `budget` iterations when it is an int) on the noisy stack; then, from the
    saved model, the x8 ensemble (with `ensemble`), the plain blind-spot mean (with `plain`) and,
    with `raw`, the same outputs from the network's own mean, without the lattice refinement."""
    import json

    import tifffile

    from napari_tbsn import Denoiser
    from napari_tbsn.cli import main

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "noisy.tif", Path(folder) / "denoised.tif"
        model = Path(folder) / "model.safetensors"
        report = Path(folder) / "report.json"
        tifffile.imwrite(source, noisy, metadata={"axes": axes})
        start = time.perf_counter()
        length = ["--iterations", str(budget)] if isinstance(budget, int) else ["--time-budget", str(budget)]
        code = main(["denoise", str(source), "-o", str(target), "--axes", axes, "--preset", preset,
                     *length, "--pd", str(pd), "--device", device, "--quiet",
                     "--save-model", str(model), "--report", str(report), *options])
        result = {"seconds": time.perf_counter() - start}
        if code != 0:
            raise RuntimeError(f"tbsn denoise failed with exit code {code}")
        result["denoised"] = tifffile.imread(target)
        result["report"] = json.loads(report.read_text())
        denoiser = Denoiser.load(model, device=device)
        result["iterations"] = denoiser.summary.iterations
        result["kept"] = denoiser.summary.best_iteration
        plain = plain and denoiser.uses_posterior

        if plain:
            result["plain"] = denoiser.predict(noisy, axes, estimator="blind_spot")
        if raw and denoiser.lattice_filter is not None:
            result["raw"] = denoiser.predict(noisy, axes, lattice=False)
            if plain:
                result["raw_plain"] = denoiser.predict(noisy, axes, lattice=False, estimator="blind_spot")
        if ensemble:
            start = time.perf_counter()
            result["ensemble"] = denoiser.predict(noisy, axes, ensemble=8)
            result["ensemble_seconds"] = time.perf_counter() - start
        return result


def generalized_anscombe(x: np.ndarray, sigma: float) -> np.ndarray:
    return 2.0 * np.sqrt(np.maximum(x + 3.0 / 8.0 + sigma**2, 0.0))


def inverse_anscombe(d: np.ndarray, sigma: float) -> np.ndarray:
    """Closed-form approximation of the exact unbiased inverse (Makitalo and Foi)."""
    d = np.maximum(d, 0.8)
    s = np.sqrt(1.5)
    return 0.25 * d**2 + 0.25 * s / d - 11.0 / 8.0 / d**2 + 0.625 * s / d**3 - 0.125 - sigma**2


def run_bm3d(noisy: np.ndarray, case) -> tuple[np.ndarray, float]:
    np.trapz = getattr(np, "trapz", None) or np.trapezoid  # bm4d still calls np.trapz
    import bm3d

    from cases import CORRELATION_KERNEL

    start = time.perf_counter()
    planes = noisy.reshape(-1, *noisy.shape[-2:]).astype(np.float64)
    out = np.empty_like(planes)
    for index, plane in enumerate(planes):
        stabilised = generalized_anscombe(plane, case.read_sigma)
        if case.correlated:
            spectrum = np.abs(np.fft.fft2(CORRELATION_KERNEL, s=plane.shape)) ** 2
            # The true noise spectrum, in the convention of BENCHMARK.md (|FFT(k)|^2 * image size).
            denoised = bm3d.bm3d(stabilised, sigma_psd=spectrum * spectrum.size)
        else:
            denoised = bm3d.bm3d(stabilised, sigma_psd=1.0)
        out[index] = inverse_anscombe(denoised, case.read_sigma)
    return out.reshape(noisy.shape), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="D1,D2,D3,D4")
    parser.add_argument("--budget", type=float, default=300.0, help="fitting seconds for napari-tbsn")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--pd", default="auto")
    parser.add_argument("--plain", default="D1",
                        help="cases that also report the plain blind-spot mean (same model and prediction settings)")
    parser.add_argument("--raw", default="D1",
                        help="cases that also report the network's own mean, without the lattice refinement")
    parser.add_argument("--told", default="D1",
                        help="pixel-independent cases also fitted told the true noise model (gain 1 and the read "
                        "noise, in photons), as BM3D + VST is told it; a second fit")
    parser.add_argument("--iterations", default="",
                        help="fixed iterations per case instead of the time budget, e.g. D1=813,D2=785: the PSNR then "
                        "does not depend on the machine's speed, so runs of different code compare exactly")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ensemble", action="store_true", help="also report the x8 self-ensemble")
    parser.add_argument("--no-bm3d", action="store_true")
    args = parser.parse_args()

    rows = []
    for name in args.cases.split(","):
        case = CASES[name.strip()]
        clean, noisy = make_case(case)
        row = {"case": case.name, "noisy": psnr(noisy, clean)}
        fixed = dict(pair.split("=") for pair in args.iterations.split(",") if pair)
        budget = int(fixed[case.name]) if case.name in fixed else args.budget
        tbsn = run_tbsn(noisy, case.axes, budget, args.preset, args.pd, args.device, args.ensemble,
                        case.name in args.plain.split(","), case.name in args.raw.split(","))
        row["tbsn"], row["tbsn_s"], row["iterations"] = psnr(tbsn["denoised"], clean), tbsn["seconds"], tbsn["iterations"]
        report = tbsn["report"]
        row["pd"], row["estimator"] = report["pd"], report["estimator"]
        row["context"] = report.get("context_planes", 0)
        row["gain"] = report["noise_model"]["gain"][0]
        if report["quality_estimate"]:
            row["estimated"] = report["quality_estimate"]["psnr"]
        if "plain" in tbsn:
            row["plain"] = psnr(tbsn["plain"], clean)
        if "raw" in tbsn:
            row["raw"] = psnr(tbsn["raw"], clean)
        if "raw_plain" in tbsn:
            row["raw_plain"] = psnr(tbsn["raw_plain"], clean)
        if "ensemble" in tbsn:
            row["x8"], row["x8_s"] = psnr(tbsn["ensemble"], clean), tbsn["ensemble_seconds"]
        if case.name in args.told.split(",") and not case.correlated:
            told = run_tbsn(noisy, case.axes, budget, args.preset, args.pd, args.device, False, False, False,
                            ("--gain", "1", "--read-noise", str(case.read_sigma)))
            row["told"], row["told_its"] = psnr(told["denoised"], clean), told["iterations"]
            if told["report"]["quality_estimate"]:
                row["told_estimated"] = told["report"]["quality_estimate"]["psnr"]
        if not args.no_bm3d:
            try:
                estimate, seconds = run_bm3d(noisy, case)
                row["bm3d"], row["bm3d_s"] = psnr(estimate, clean), seconds
            except ImportError:
                pass
        rows.append(row)
        print(f"# {case.name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in row.items()), flush=True)

    print(f"\ntbsn denoise --preset {args.preset} --time-budget {args.budget:g} --pd {args.pd}; PSNR in dB; "
          "napari-tbsn seconds include reading, fitting, prediction and writing")
    print("| case | noisy | napari-tbsn (s, iterations) | output, pd, context planes | estimated without clean data "
          "| plain blind-spot mean | without lattice refinement: output / plain | x8 ensemble (predict s) "
          "| told the noise model: output (estimated) | BM3D + VST (s) | Noise2Void 300 s (quoted) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        def cell(key: str, seconds: str | None = None) -> str:
            if key not in row:
                return "n/a"
            return f"{row[key]:.2f}" + (f" ({row[seconds]:.0f})" if seconds else "")

        print(f"| {row['case']} | {row['noisy']:.2f} | {row['tbsn']:.2f} ({row['tbsn_s']:.0f}, {row['iterations']}) "
              f"| {row['estimator']}, pd {row['pd']}, context {row['context']} | {cell('estimated')} | {cell('plain')} "
              f"| {cell('raw')} / {cell('raw_plain')} | {cell('x8', 'x8_s')} | {cell('told')} ({cell('told_estimated')}) "
              f"| {cell('bm3d', 'bm3d_s')} | {NOISE2VOID_300S[row['case']]:.2f} |")


if __name__ == "__main__":
    main()
