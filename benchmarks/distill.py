"""Distillation benchmark (TBSN2UNet): the student against the teacher it was distilled from.

    python benchmarks/distill.py [--cases D1,D2,D3] [--budget 300] [--skip-throughput] [--stack]

1. Throughput: the small teacher (its default, memory-sized tile) and its student predicting
   the same 1024x1024 plane, in this process, on the CPU and on CUDA when present.
2. Quality: per case, the small teacher fitted for --budget seconds, then distilled with the
   default settings; PSNR against the clean reference of the teacher's output, the student's
   and the default output's (the student unless its check on held-out pixels found it worse;
   with the check's own estimate of the difference), on the same planes (at most --planes evenly spaced planes of a stack, which keeps
   the teacher's share of the run short), with the distillation's time.
   --ensemble-targets: also a second student from the same teacher, its targets averaged over
   the x8 self-ensemble (flips and rotations), trained exactly as the first.
3. --stack: a 20-plane 1024x1024 stack (img2d tiled 2x2, each plane a shifted crop, with D1's
   noise): `tbsn denoise --preset small --time-budget 300` with --student auto and with
   --student off: wall time and PSNR of both.
All numbers come from this one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, DATA, make_case, psnr  # noqa: E402

from napari_tbsn import Denoiser  # noqa: E402
from napari_tbsn.devices import available_devices  # noqa: E402
from napari_tbsn.network.unet import UNet, student_preset  # noqa: E402
from napari_tbsn.student import Student  # noqa: E402


def throughput(device: str, size: int = 1024) -> dict:
    """Mpx/s of teacher and student on one size x size plane (speed does not depend on the
    weights: a briefly fitted teacher and an untrained student of the right shapes)."""
    rng = np.random.default_rng(0)
    plane = rng.poisson(10.0, (size, size)).astype(np.float32)
    denoiser = Denoiser(preset="small", device=device, pd=1)
    denoiser.fit(plane, "YX", iterations=2)
    model = denoiser.model
    student = UNet(student_preset("small", model.channels, model.channels)).to(denoiser.device).eval()
    with_student = Denoiser.from_model(dataclasses.replace(model, student=Student(student)), denoiser.options,
                                       device=device)
    rates = {}
    for name, use_student in (("student", True), ("teacher", False)):
        with_student.predict(plane[:128, :128], "YX", student=use_student)  # warm-up
        start = time.perf_counter()
        with_student.predict(plane, "YX", student=use_student)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates[name] = size * size / 1e6 / (time.perf_counter() - start)
    return rates


def evaluation_picks(noisy: np.ndarray, axes: str, planes: int) -> np.ndarray | None:
    """At most `planes` evenly spaced planes of a stack; None for all (2D images, planes 0)."""
    if axes == "YX" or planes == 0 or noisy.shape[0] <= planes:
        return None
    return np.linspace(0, noisy.shape[0] - 1, planes).round().astype(int)


def quality(case_name: str, budget: float, planes: int, device: str, ensemble_targets: bool = False) -> dict:
    case = CASES[case_name]
    clean, noisy = make_case(case)
    denoiser = Denoiser(preset="small", device=device)
    denoiser.fit(noisy, case.axes, time_budget=budget)
    start = time.perf_counter()
    denoiser.distil(noisy, case.axes)
    row = {"case": case_name, "iterations": denoiser.summary.iterations, "distil_s": time.perf_counter() - start,
           "student_summary": denoiser.student.summary.describe()}
    picks = evaluation_picks(noisy, case.axes, planes)
    reference = clean if picks is None else clean[picks]
    check = denoiser.student.summary
    row["estimated"], row["preferred"] = check.estimated_change_db, check.preferred
    # The default output (student "auto"): the student unless its check found it worse.
    for name, use_student in (("teacher", False), ("student", True), ("default", "auto")):
        start = time.perf_counter()
        row[name] = psnr(_predict_planes(denoiser, noisy, case.axes, picks, use_student), reference)
        row[f"{name}_s"] = time.perf_counter() - start
    row["evaluated"] = "all" if picks is None else f"{len(picks)} of {noisy.shape[0]} planes"
    if ensemble_targets:  # the same teacher, its targets averaged over the x8 self-ensemble
        x8 = Denoiser.from_model(dataclasses.replace(denoiser.model, student=None),
                                 denoiser.options.replace(ensemble=8), device=device)
        start = time.perf_counter()
        x8.distil(noisy, case.axes)
        row["x8_distil_s"] = time.perf_counter() - start
        row["x8_student"] = psnr(_predict_planes(x8, noisy, case.axes, picks, True), reference)
    return row


def _predict_planes(denoiser: Denoiser, noisy: np.ndarray, axes: str, picks, use_student: bool | str) -> np.ndarray:
    """The denoised planes `picks` (all where None), each predicted with its context planes as
    in a whole-stack prediction (the same neighbours, the whole stack's ensemble)."""
    ensemble = denoiser.ensemble_size(noisy.shape)
    if picks is None:
        return denoiser.predict(noisy, axes, student=use_student, ensemble=ensemble)
    reach = denoiser.context_planes
    planes = []
    for pick in picks:
        low, high = max(0, pick - reach), min(noisy.shape[0], pick + reach + 1)
        window = denoiser.predict(noisy[low:high], axes, student=use_student, ensemble=ensemble)
        planes.append(window[pick - low])
    return np.stack(planes)


def stack_case(planes: int = 20, size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy): img2d tiled 2x2 and cropped with a shift per plane, D1's noise."""
    import tifffile

    reference = tifffile.imread(DATA / CASES["D1"].reference).astype(np.float64)
    low, high = np.percentile(reference, [0.1, 99.9])
    tiled = np.tile(np.clip((reference - low) / (high - low), 0, 1), (3, 3)) * CASES["D1"].peak
    clean = np.stack([tiled[3 * z : 3 * z + size, 5 * z : 5 * z + size] for z in range(planes)])
    rng = np.random.default_rng(0)
    noisy = rng.poisson(clean) + rng.normal(0, CASES["D1"].read_sigma, clean.shape)
    return clean, noisy.astype(np.float32)


def stack_run(budget: float) -> list[dict]:
    import tifffile

    from napari_tbsn.cli import main

    clean, noisy = stack_case()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "noisy.tif"
        tifffile.imwrite(source, noisy, metadata={"axes": "ZYX"})
        for choice in ("auto", "off"):
            target = Path(folder) / f"denoised_{choice}.tif"
            start = time.perf_counter()
            code = main(["denoise", str(source), "-o", str(target), "--axes", "ZYX", "--preset", "small",
                         "--time-budget", str(budget), "--student", choice])
            if code:
                raise RuntimeError(f"tbsn denoise --student {choice} failed with exit code {code}")
            rows.append({"student": choice, "seconds": time.perf_counter() - start,
                         "psnr": psnr(tifffile.imread(target), clean)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="D1,D2,D3")
    parser.add_argument("--budget", type=float, default=300.0, help="teacher fitting seconds")
    parser.add_argument("--planes", type=int, default=8, help="planes of a stack to evaluate (0: all)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--ensemble-targets", action="store_true",
                        help="also distil a student from the teacher's x8 self-ensemble targets (same student cost)")
    parser.add_argument("--stack", action="store_true", help="also time the 20-plane 1024x1024 stack")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    if not args.skip_throughput:
        print("| device | teacher Mpx/s | student Mpx/s | ratio |\n| --- | --- | --- | --- |")
        for device, _ in available_devices():
            if device == "cpu" or device == "cuda:0":
                rates = throughput(device)
                print(f"| {device} | {rates['teacher']:.3f} | {rates['student']:.3f} | "
                      f"{rates['student'] / rates['teacher']:.0f}x |", flush=True)
    if args.cases:
        print("| case | evaluated | teacher PSNR | student PSNR | difference | estimated by the check | default "
              "(PSNR) | distillation s (check included) | teacher / student / default predict s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
        for name in args.cases.split(","):
            r = quality(name, args.budget, args.planes, "auto", args.ensemble_targets)
            estimated = "not checked" if r["preferred"] is None else \
                "worse" if r["estimated"] is None and not r["preferred"] else \
                "no worse" if r["estimated"] is None else f"{r['estimated']:+.2f}"
            default = "student" if r["preferred"] is not False else "teacher"
            print(f"| {r['case']} | {r['evaluated']} | {r['teacher']:.2f} | {r['student']:.2f} | "
                  f"{r['student'] - r['teacher']:+.2f} | {estimated} | {default} ({r['default']:.2f}) | "
                  f"{r['distil_s']:.0f} | {r['teacher_s']:.1f} / {r['student_s']:.1f} / {r['default_s']:.1f} |",
                  flush=True)
            print(f"  {r['case']}: teacher fitted {r['iterations']} iterations; {r['student_summary']}", flush=True)
            if args.ensemble_targets:
                print(f"  {r['case']}: student from x8-ensemble targets {r['x8_student']:.2f} dB "
                      f"({r['x8_student'] - r['student']:+.2f} against the default targets' student), distilled in "
                      f"{r['x8_distil_s']:.0f} s (default targets: {r['distil_s']:.0f} s)", flush=True)
    if args.stack:
        rows = stack_run(args.budget)
        print("| --student | wall s | PSNR |\n| --- | --- | --- |")
        for r in rows:
            print(f"| {r['student']} | {r['seconds']:.0f} | {r['psnr']:.2f} |")
        print(f"speed-up {rows[1]['seconds'] / rows[0]['seconds']:.2f}x, PSNR difference "
              f"{rows[0]['psnr'] - rows[1]['psnr']:+.2f} dB", flush=True)


if __name__ == "__main__":
    main()
