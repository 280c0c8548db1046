"""Fitting beside other work: iterations per second of a `small` fit on a 512x512 image, alone
and beside one busy process (a pure-Python loop holding one core), with the default threads
("auto": the cores no other program is busy on) and, for comparison, with every core.

    python benchmarks/threads.py [--iterations 40]

torch's OpenMP threads spin while they wait for each other, so a thread that shares its core
with another program stalls every step: the fit should slow in proportion to the cores taken
(on 2 cores: to about half), not tenfold. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import torch

from napari_tbsn import Denoiser
from napari_tbsn.devices import choose_threads, forget_busy_cores, usable_cores


def iterations_per_second(image: np.ndarray, iterations: int, threads) -> tuple[float, int]:
    """(training iterations per second, threads used), from the progress of one fit, without
    its set-up and closing steps."""
    stamps: list[tuple[int, float]] = []
    forget_busy_cores()  # measure the load now: a busy process may have started since the last run
    used = choose_threads(threads)
    denoiser = Denoiser(preset="small", device="cpu", threads=used)
    denoiser.fit(image, "YX", iterations=iterations,
                 callback=lambda progress: stamps.append((progress.iteration, time.perf_counter())))
    (first, start), (last, end) = stamps[1], stamps[-1]  # from the second: the first includes warm-up
    return (last - first) / (end - start), used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    image = np.random.default_rng(0).poisson(10.0, (args.size, args.size)).astype(np.float32)
    cores = usable_cores()
    rows = []
    for label, threads in (("auto (default)", "auto"), (f"all {cores} cores", cores)):
        alone = iterations_per_second(image, args.iterations, threads)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)  # let the busy process show in the machine's statistics
            beside = iterations_per_second(image, args.iterations, threads)
        finally:
            busy.kill()
            busy.wait()
        rows.append((label, alone, beside))
    print(f"torch {torch.__version__}, {cores} usable cores, `small` fit on {args.size}x{args.size}, "
          f"{args.iterations} iterations per run")
    print("| threads | alone: it/s (threads) | beside one busy process: it/s (threads) | beside / alone |")
    print("| --- | --- | --- | --- |")
    for label, (rate, used), (busy_rate, busy_used) in rows:
        print(f"| {label} | {rate:.2f} ({used}) | {busy_rate:.2f} ({busy_used}) | {busy_rate / rate:.0%} |")


if __name__ == "__main__":
    main()
