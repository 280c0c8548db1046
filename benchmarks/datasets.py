"""Datasets: one model on many images, and many images through one process.

    python benchmarks/datasets.py crops [--budget 300] [--preset small]
        Four non-overlapping 256x256 crops of img2d with D1's noise (peak 20, read noise 1):
        each crop fitted alone, and one model fitted on all four, at the same budget; PSNR of
        each crop's prediction by both.
    python benchmarks/datasets.py batch [--files 20] [--side 512]
        One saved model (fitted and distilled briefly: the student is what `tbsn predict` uses
        by default) and a folder of files: `tbsn predict FOLDER` in one process against one
        `tbsn predict` process per file, in the same run; the outputs must be identical.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, make_case, psnr  # noqa: E402

CROPS = [np.s_[0:256, 0:256], np.s_[0:256, 256:512], np.s_[256:512, 0:256], np.s_[256:512, 256:512]]


def crops(args: argparse.Namespace) -> None:
    from napari_tbsn import Denoiser

    clean, noisy = make_case(CASES["D1"])
    pairs = [(clean[region], np.ascontiguousarray(noisy[region])) for region in CROPS]
    budget = {"iterations": args.iterations} if args.iterations else {"time_budget": args.budget}
    rows = []
    for index, (reference, image) in enumerate(pairs):
        start = time.perf_counter()
        alone = Denoiser(preset=args.preset, seed=args.seed).fit(image, "YX", **budget)
        rows.append({"crop": index + 1, "noisy": psnr(image, reference),
                     "alone": psnr(alone.predict(image, "YX"), reference), "alone_it": alone.summary.iterations,
                     "alone_best": alone.summary.best_iteration, "alone_s": time.perf_counter() - start})
        print(f"crop {index + 1} alone: {rows[-1]['alone']:.2f} dB", flush=True)
    start = time.perf_counter()
    together = Denoiser(preset=args.preset, seed=args.seed).fit([image for _, image in pairs], "YX", **budget,
                                                                 names=[f"crop {i + 1}" for i in range(4)])
    fit_seconds = time.perf_counter() - start
    for row, (reference, image) in zip(rows, pairs):
        row["together"] = psnr(together.predict(image, "YX"), reference)
    print(f"\none model on all four: {together.summary.describe()} ({fit_seconds:.0f} s)\n")
    print("| crop | noisy | alone (iterations, best at) | together | gain |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['crop']} | {row['noisy']:.2f} | {row['alone']:.2f} ({row['alone_it']}, {row['alone_best']}) "
              f"| {row['together']:.2f} | {row['together'] - row['alone']:+.2f} |")
    gains = [row["together"] - row["alone"] for row in rows]
    print(f"| mean | | {np.mean([r['alone'] for r in rows]):.2f} | {np.mean([r['together'] for r in rows]):.2f} "
          f"| {np.mean(gains):+.2f} |")
    print(f"\ntogether: {together.summary.iterations} iterations, best at {together.summary.best_iteration}")


def batch(args: argparse.Namespace) -> None:
    import tifffile

    from napari_tbsn import Denoiser

    clean, noisy = make_case(CASES["D2"])  # nuclei planes: 512x512 sections of one stack
    folder = Path(tempfile.mkdtemp(prefix="tbsn-batch-"))
    raw = folder / "raw"
    raw.mkdir()
    planes = noisy[:, : args.side, : args.side]
    for index in range(args.files):
        tifffile.imwrite(raw / f"plane{index:02d}.tif", planes[index % len(planes)])
    model = folder / "model.safetensors"
    denoiser = Denoiser(preset=args.preset).fit(planes[0], "YX", iterations=args.fit_iterations)
    if args.student:
        denoiser.distil(planes[0], "YX", iterations=args.fit_iterations)
    denoiser.save(model)
    tbsn = [sys.executable, "-m", "napari_tbsn", "predict"]
    runs = []
    for attempt in range(args.repeats):  # interleaved: one folder run, then the per-file runs
        one = folder / f"one{attempt}"
        start = time.perf_counter()
        subprocess.run([*tbsn, str(raw), "--model", str(model), "-o", str(one), "--quiet"], check=True)
        one_seconds = time.perf_counter() - start
        each = folder / f"each{attempt}"
        each.mkdir()
        start = time.perf_counter()
        for path in sorted(raw.iterdir()):
            subprocess.run([*tbsn, str(path), "--model", str(model), "-o", str(each / path.name), "--quiet"],
                           check=True)
        each_seconds = time.perf_counter() - start
        identical = all(np.array_equal(tifffile.imread(one / path.name), tifffile.imread(each / path.name))
                        for path in sorted(raw.iterdir()))
        runs.append((one_seconds, each_seconds, identical))
        print(f"run {attempt + 1}: one process {one_seconds:.1f} s, {args.files} processes {each_seconds:.1f} s, "
              f"identical outputs: {identical}", flush=True)
    output = "student" if args.student else "teacher"
    print(f"\n{args.files} files of {args.side}x{args.side}, {args.preset} model ({output} output)\n")
    print("| run | one process (s) | one process per file (s) | speed-up | outputs identical |")
    print("|---|---|---|---|---|")
    for attempt, (one_seconds, each_seconds, identical) in enumerate(runs, start=1):
        print(f"| {attempt} | {one_seconds:.1f} | {each_seconds:.1f} | {each_seconds / one_seconds:.1f}x | "
              f"{'yes' if identical else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    crop = commands.add_parser("crops")
    crop.add_argument("--budget", type=float, default=300.0)
    crop.add_argument("--iterations", type=int, help="fixed iterations instead of the budget (quick checks)")
    crop.add_argument("--preset", default="small")
    crop.add_argument("--seed", type=int, default=0)
    crop.set_defaults(run=crops)
    files = commands.add_parser("batch")
    files.add_argument("--files", type=int, default=20)
    files.add_argument("--side", type=int, default=512)
    files.add_argument("--preset", default="small")
    files.add_argument("--fit-iterations", type=int, default=100)
    files.add_argument("--student", action=argparse.BooleanOptionalAction, default=True)
    files.add_argument("--repeats", type=int, default=1)
    files.set_defaults(run=batch)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
